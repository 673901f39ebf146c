//! Choosing the compute device at run time.

use candle_core::Device;

use crate::error::{Error, Result};

/// Parses a device name: `cpu`, `cuda` (or `cuda:N`), `metal`, or `auto` (CUDA if this build
/// has it and a GPU answers, then Metal likewise, else CPU).
///
/// # Errors
/// [`Error::Device`] if the device is unknown, not compiled in (cargo features `cuda`, `metal`)
/// or not present.
///
/// # Example
/// ```
/// let device = themescan::device::select_device("cpu").unwrap();
/// assert!(device.is_cpu());
/// ```
pub fn select_device(name: &str) -> Result<Device> {
    let unavailable = |reason: String| Error::Device {
        requested: name.to_string(),
        reason,
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                return Err(unavailable(
                    "this build lacks the `metal` cargo feature".into(),
                ));
            }
            Device::new_metal(0).map_err(|e| unavailable(e.to_string()))
        }
        _ => {
            let ordinal = match name.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| unavailable("expected `cuda` or `cuda:N`".into()))?,
                None => {
                    return Err(unavailable(
                        "expected cpu, cuda, cuda:N, metal or auto".into(),
                    ))
                }
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(unavailable(
                    "this build lacks the `cuda` cargo feature".into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| unavailable(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_device_names_the_choices() {
        let err = select_device("tpu").unwrap_err().to_string();
        assert!(err.contains("tpu") && err.contains("cpu, cuda"), "{err}");
    }

    #[test]
    fn auto_always_finds_a_device() {
        assert!(select_device("auto").is_ok());
    }
}
