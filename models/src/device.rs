//! Device selection: `auto`, `cpu`, `cuda` or `metal`.
//!
//! GPU back ends exist only in builds with the `cuda` or `metal` cargo feature. A GPU build on
//! a machine without the GPU falls back to the CPU with a warning instead of failing; asking
//! for a back end the build lacks is an error that says how to get it.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first GPU this build supports and the machine has, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (needs the `cuda` feature).
    Cuda,
    /// The first Metal GPU (needs the `metal` feature).
    Metal,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "metal" => Ok(Self::Metal),
            _ => Err(format!(
                "unknown device '{s}'; expected auto, cpu, cuda or metal"
            )),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        })
    }
}

/// The device chosen, and a warning to show when it is not what was asked for.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    /// The device to train on.
    pub device: Device,
    /// Why a GPU that was asked for (or that `auto` would prefer) is not used.
    pub warning: Option<String>,
}

impl SelectedDevice {
    /// A short name of the device (`cpu`, `cuda:0`, `metal:0`).
    pub fn name(&self) -> String {
        device_name(&self.device)
    }
}

/// A short name of `device` (`cpu`, `cuda:0`, `metal:0`).
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda:0".into(),
        Device::Metal(_) => "metal:0".into(),
    }
}

/// Picks the device for `choice`.
pub fn select(choice: DeviceChoice) -> Result<SelectedDevice> {
    let cpu = |warning: Option<String>| SelectedDevice {
        device: Device::Cpu,
        warning,
    };
    match choice {
        DeviceChoice::Cpu => Ok(cpu(None)),
        DeviceChoice::Cuda if !cfg!(feature = "cuda") => Err(Error::Device(
            "this build has no CUDA support; rebuild with `cargo build --release --features cuda` or use --device cpu".into(),
        )),
        DeviceChoice::Metal if !cfg!(feature = "metal") => Err(Error::Device(
            "this build has no Metal support; rebuild with `cargo build --release --features metal` or use --device cpu".into(),
        )),
        DeviceChoice::Cuda => Ok(gpu(Device::new_cuda(0), "CUDA").unwrap_or_else(|w| cpu(Some(w)))),
        DeviceChoice::Metal => {
            Ok(gpu(Device::new_metal(0), "Metal").unwrap_or_else(|w| cpu(Some(w))))
        }
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda") {
                return Ok(gpu(Device::new_cuda(0), "CUDA").unwrap_or_else(|w| cpu(Some(w))));
            }
            if cfg!(feature = "metal") {
                return Ok(gpu(Device::new_metal(0), "Metal").unwrap_or_else(|w| cpu(Some(w))));
            }
            Ok(cpu(None))
        }
    }
}

/// The GPU, or the warning to show when falling back to the CPU.
fn gpu(
    device: candle_core::Result<Device>,
    kind: &str,
) -> std::result::Result<SelectedDevice, String> {
    match device {
        Ok(device) => Ok(SelectedDevice {
            device,
            warning: None,
        }),
        Err(e) => Err(format!(
            "no usable {kind} device ({}); training on the CPU instead",
            one_line(&e.to_string())
        )),
    }
}

fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print() {
        for s in ["auto", "cpu", "cuda", "metal"] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap().to_string(), s);
        }
        assert!("tpu".parse::<DeviceChoice>().unwrap_err().contains("tpu"));
    }

    #[test]
    fn cpu_and_auto_work_on_any_machine() {
        assert!(select(DeviceChoice::Cpu).unwrap().device.is_cpu());
        let auto = select(DeviceChoice::Auto).unwrap();
        if !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(auto.device.is_cpu());
            assert!(auto.warning.is_none());
        }
    }

    #[test]
    fn a_gpu_this_build_lacks_is_a_clear_error() {
        if !cfg!(feature = "cuda") {
            let e = select(DeviceChoice::Cuda).unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        if !cfg!(feature = "metal") {
            let e = select(DeviceChoice::Metal).unwrap_err().to_string();
            assert!(e.contains("--features metal"), "{e}");
        }
    }
}
