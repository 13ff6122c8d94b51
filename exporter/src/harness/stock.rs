//! The original model with its KV cache (stock attention, as exported), driven by the same timing
//! code: each step feeds the previous step's present key/values back as the past, through IO
//! binding so caches stay on the device.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynValue, TensorElementType, ValueType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::runtime::{Device, Runtime};
use super::tensor::{Host, HostData};

/// One past/present pair of the KV cache.
struct CachePair {
    past: String,
    present: String,
    /// (heads, head_dim) of the cache layout (batch, heads, seq, head_dim).
    heads: i64,
    head_dim: i64,
    dtype: TensorElementType,
}

pub struct StockModel {
    session: Session,
    device: Device,
    pairs: Vec<CachePair>,
    input_ids: String,
    attention_mask: Option<String>,
    position_ids: Option<String>,
    logits: String,
}

/// The key after the first '.' (`past_key_values.3.key` and `present.3.key` both give `3.key`).
fn cache_key(name: &str) -> Option<&str> {
    name.split_once('.').map(|(_, rest)| rest)
}

impl StockModel {
    pub fn load(rt: &Runtime, model: &Path, device: Device) -> Result<StockModel> {
        let session = rt.plain_session(model, device)?;
        let find = |cands: &[&str]| {
            session
                .inputs()
                .iter()
                .map(|i| i.name().to_string())
                .find(|n| cands.contains(&n.as_str()))
        };
        let input_ids =
            find(&["input_ids"]).context("the original model has no input_ids input")?;
        let attention_mask = find(&["attention_mask"]);
        let position_ids = find(&["position_ids"]);
        let logits = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .find(|n| n == "logits")
            .context("the original model has no logits output")?;
        let mut pairs = Vec::new();
        for input in session
            .inputs()
            .iter()
            .filter(|i| i.name().starts_with("past"))
        {
            let key = cache_key(input.name())
                .with_context(|| format!("cache input '{}'", input.name()))?;
            let present = session
                .outputs()
                .iter()
                .find(|o| o.name().starts_with("present") && cache_key(o.name()) == Some(key))
                .with_context(|| {
                    format!(
                        "no present output pairs with cache input '{}'",
                        input.name()
                    )
                })?;
            let ValueType::Tensor { ty, shape, .. } = input.dtype() else {
                bail!("cache input '{}' is not a tensor", input.name())
            };
            if shape.len() != 4 || shape[1] <= 0 || shape[3] <= 0 {
                bail!("cache input '{}' has shape {shape:?}; expected (batch, heads, past, head_dim) with fixed heads and head_dim", input.name());
            }
            pairs.push(CachePair {
                past: input.name().to_string(),
                present: present.name().to_string(),
                heads: shape[1],
                head_dim: shape[3],
                dtype: *ty,
            });
        }
        if pairs.is_empty() {
            bail!("the original model has no past_* KV-cache inputs: export it with use_cache / past key values");
        }
        Ok(StockModel {
            session,
            device,
            pairs,
            input_ids,
            attention_mask,
            position_ids,
            logits,
        })
    }

    /// Bytes of KV cache per sequence per token of context.
    pub fn cache_bytes_per_token(&self) -> u64 {
        self.pairs
            .iter()
            .map(|p| {
                (p.heads * p.head_dim) as u64
                    * if p.dtype == TensorElementType::Float32 {
                        4
                    } else {
                        2
                    }
            })
            .sum()
    }

    /// Times `steps` decode steps of a batch at `context` tokens of (synthetic) history: the cache
    /// starts as random values of that length and grows by one token per step, as in decoding.
    pub fn time_steps(
        &mut self,
        batch: usize,
        context: usize,
        steps: usize,
        seed: u64,
    ) -> Result<Vec<f64>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let alloc = match self.device {
            Device::Cpu => Allocator::default(),
            Device::Cuda { .. } => Allocator::new(
                &self.session,
                MemoryInfo::new(
                    AllocationDevice::CUDA,
                    0,
                    AllocatorType::Device,
                    MemoryType::Default,
                )?,
            )?,
        };
        let mut pasts: Vec<DynValue> = Vec::new();
        for p in &self.pairs {
            let shape = [batch as i64, p.heads, context as i64, p.head_dim];
            let n = shape.iter().product::<i64>() as usize;
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let data = match p.dtype {
                TensorElementType::Float32 => HostData::F32(v),
                TensorElementType::Float16 => {
                    HostData::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect())
                }
                TensorElementType::Bfloat16 => {
                    HostData::BF16(v.iter().map(|&x| half::bf16::from_f32(x)).collect())
                }
                other => bail!("cache '{}' has element type {other:?}", p.past),
            };
            pasts.push(
                Host {
                    shape: shape.to_vec(),
                    data,
                }
                .to_ort(&alloc)?
                .into_dyn(),
            );
        }
        let out_mem = match self.device {
            Device::Cpu => MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )?,
            Device::Cuda { .. } => MemoryInfo::new(
                AllocationDevice::CUDA,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )?,
        };
        let cpu = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )?;
        let mut times = Vec::with_capacity(steps);
        for s in 0..steps {
            let len = (context + s) as i64;
            let b = batch as i64;
            let mut binding = self.session.create_binding()?;
            binding.bind_input(
                self.input_ids.as_str(),
                &Host::i64(&[b, 1], (0..b).map(|i| (i * 7 + s as i64) % 50).collect())
                    .to_ort(&Allocator::default())?,
            )?;
            if let Some(name) = &self.attention_mask {
                binding.bind_input(
                    name.as_str(),
                    &Host::i64(&[b, len + 1], vec![1; (b * (len + 1)) as usize])
                        .to_ort(&Allocator::default())?,
                )?;
            }
            if let Some(name) = &self.position_ids {
                binding.bind_input(
                    name.as_str(),
                    &Host::i64(&[b, 1], vec![len; batch]).to_ort(&Allocator::default())?,
                )?;
            }
            for (p, v) in self.pairs.iter().zip(&pasts) {
                binding.bind_input(p.past.as_str(), v)?;
                binding.bind_output_to_device(p.present.as_str(), &out_mem)?;
            }
            binding.bind_output_to_device(self.logits.as_str(), &cpu)?;
            let t = Instant::now();
            let mut out = self
                .session
                .run_binding(&binding)
                .context("stock decode step")?;
            times.push(t.elapsed().as_secs_f64());
            pasts = self
                .pairs
                .iter()
                .map(|p| {
                    out.remove(p.present.as_str())
                        .with_context(|| format!("output {}", p.present))
                })
                .collect::<Result<_>>()?;
        }
        Ok(times)
    }
}
