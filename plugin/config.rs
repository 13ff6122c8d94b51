//! Attributes, read and checked once when ONNX Runtime creates the kernel.

use crate::error::{Error, Result};
use crate::schema::{AttrValue, OpSchema};

/// Where attribute values come from (ORT's kernel info, or a test).
pub trait AttributeSource {
    fn int(&self, name: &str) -> Result<Option<i64>>;
    fn float(&self, name: &str) -> Result<Option<f32>>;
}

/// Checked attributes of one node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    pub deg: usize,
    /// As given: 0 means `1/sqrt(Dk)`, resolved by [`Config::scale_for`] once Dk is known.
    pub scale: f32,
    pub chunk_size: usize,
}

impl Config {
    pub fn from_attributes(op: &'static OpSchema, src: &dyn AttributeSource) -> Result<Config> {
        let int = |name: &'static str| -> Result<i64> {
            match src.int(name)? {
                Some(v) => Ok(v),
                None => match op.attribute(name).map(|a| a.default) {
                    Some(AttrValue::Int(v)) => Ok(v),
                    _ => Ok(0),
                },
            }
        };
        let deg = int("deg")?;
        if deg < 2 || deg % 2 != 0 || deg > 16 {
            return Err(Error::Attribute {
                op: op.name,
                name: "deg",
                expected: "an even integer in [2, 16]".into(),
                got: deg.to_string(),
            });
        }
        let scale = if op.attribute("scale").is_some() {
            src.float("scale")?.unwrap_or(0.0)
        } else {
            0.0
        };
        if !scale.is_finite() {
            return Err(Error::Attribute {
                op: op.name,
                name: "scale",
                expected: "a finite float (0 = 1/sqrt(Dk))".into(),
                got: scale.to_string(),
            });
        }
        let chunk_size = if op.attribute("chunk_size").is_some() {
            int("chunk_size")?
        } else {
            64
        };
        if !(1..=1 << 16).contains(&chunk_size) {
            return Err(Error::Attribute {
                op: op.name,
                name: "chunk_size",
                expected: "an integer in [1, 65536]".into(),
                got: chunk_size.to_string(),
            });
        }
        Ok(Config {
            deg: deg as usize,
            scale,
            chunk_size: chunk_size as usize,
        })
    }

    /// The scale actually applied for key head dim `dk` (the package's rule: 0 means default).
    pub fn scale_for(&self, dk: usize) -> f32 {
        if self.scale == 0.0 {
            1.0 / (dk as f32).sqrt()
        } else {
            self.scale
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{POWER_RETENTION, POWER_RETENTION_STEP};
    use std::collections::HashMap;

    struct Attrs(HashMap<&'static str, f64>);
    impl AttributeSource for Attrs {
        fn int(&self, name: &str) -> Result<Option<i64>> {
            Ok(self.0.get(name).map(|v| *v as i64))
        }
        fn float(&self, name: &str) -> Result<Option<f32>> {
            Ok(self.0.get(name).map(|v| *v as f32))
        }
    }

    fn cfg(pairs: &[(&'static str, f64)]) -> Result<Config> {
        Config::from_attributes(&POWER_RETENTION, &Attrs(pairs.iter().copied().collect()))
    }

    #[test]
    fn defaults_come_from_the_op_table() {
        assert_eq!(
            cfg(&[]).unwrap(),
            Config {
                deg: 2,
                scale: 0.0,
                chunk_size: 64
            }
        );
        let step = Config::from_attributes(&POWER_RETENTION_STEP, &Attrs(HashMap::new())).unwrap();
        assert_eq!(step.deg, 2);
    }

    #[test]
    fn bad_attributes_are_named_in_the_error() {
        for (name, v) in [
            ("deg", 3.0),
            ("deg", 0.0),
            ("chunk_size", 0.0),
            ("scale", f64::NAN),
            ("scale", f64::INFINITY),
        ] {
            let e = cfg(&[(name, v)]).unwrap_err().to_string();
            assert!(e.contains(&format!("attribute '{name}'")), "{e}");
        }
    }

    #[test]
    fn zero_scale_means_inverse_sqrt_of_the_key_dim() {
        assert_eq!(cfg(&[]).unwrap().scale_for(64), 0.125);
        assert_eq!(cfg(&[("scale", 0.5)]).unwrap().scale_for(64), 0.5);
    }
}
