//! The original model with its KV cache (stock attention as exported, or the same model with
//! ONNX Runtime's fused attention op), driven by the same timing code: each step feeds the previous
//! step's present key/values back as the past, through IO binding so caches stay on the device; on
//! CUDA the token ids, position ids and logits cross with the same plain CUDA copies as the
//! rewritten model's (`device_copy`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensor, DynTensorValueType, DynValue, TensorElementType, ValueType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::decoder::time_greedy;
use super::device_copy::DeviceCopy;
use super::runtime::{Device, Runtime};
use super::sampling::{Sampler, Sampling};
use super::stats::StepTimes;
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
    /// Declared before the session: ORT's allocator wrapper keeps the session's arena alive.
    alloc: Allocator,
    /// Always present outside `release_memory`.
    session: Option<Session>,
    /// What reopens the session (`release_memory`).
    rt: Runtime,
    model: PathBuf,
    device: Device,
    /// CUDA copies for the per-step inputs and logits (with `--device cuda`).
    copier: Option<DeviceCopy>,
    /// Where outputs are bound (the session's allocator above allocates there).
    out_mem: MemoryInfo<'static>,
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
        let out_mem = MemoryInfo::new(
            match device {
                Device::Cpu => AllocationDevice::CPU,
                Device::Cuda { .. } => AllocationDevice::CUDA,
            },
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )?;
        let copier = match device {
            Device::Cpu => None,
            Device::Cuda { .. } => Some(DeviceCopy::new(0)?),
        };
        Ok(StockModel {
            alloc: allocator(&session, device, &out_mem)?,
            session: Some(session),
            rt: rt.clone(),
            model: model.to_path_buf(),
            device,
            copier,
            out_mem,
            pairs,
            input_ids,
            attention_mask,
            position_ids,
            logits,
        })
    }

    /// Gives the session's memory back to the device by reopening the session: ORT's arena keeps
    /// the peak of every run (a long-context KV cache and its copies) until its session ends, and
    /// a bench holds several baselines at once, so without this the later points of a sweep fail
    /// for memory the earlier ones no longer use.
    pub fn release_memory(&mut self) -> Result<()> {
        // The old allocator and session go first, so two arenas never coexist.
        self.alloc = Allocator::default();
        self.session = None;
        let session = self.rt.plain_session(&self.model, self.device)?;
        self.alloc = allocator(&session, self.device, &self.out_mem)?;
        self.session = Some(session);
        Ok(())
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
    /// Each step is timed as the rewritten model's is (inputs, run, logits to the host as f32 rows,
    /// then greedy sampling, timed apart).
    pub fn time_steps(
        &mut self,
        batch: usize,
        context: usize,
        steps: usize,
        seed: u64,
    ) -> Result<Vec<StepTimes>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pasts: Vec<DynValue> = Vec::new();
        // One block of random values serves every cache of its shape and type (a step's cost does
        // not depend on the values; drawing them per cache took minutes at long contexts).
        let mut block: Option<Host> = None;
        for p in &self.pairs {
            let shape = [batch as i64, p.heads, context as i64, p.head_dim];
            let reuse = block.as_ref().is_some_and(|h| {
                h.shape == shape
                    && matches!(
                        (&h.data, p.dtype),
                        (HostData::F32(_), TensorElementType::Float32)
                            | (HostData::F16(_), TensorElementType::Float16)
                            | (HostData::BF16(_), TensorElementType::Bfloat16)
                    )
            });
            if !reuse {
                let n = shape.iter().product::<i64>() as usize;
                let v = (0..n).map(|_| rng.random_range(-1.0f32..1.0));
                let data = match p.dtype {
                    TensorElementType::Float32 => HostData::F32(v.collect()),
                    TensorElementType::Float16 => {
                        HostData::F16(v.map(half::f16::from_f32).collect())
                    }
                    TensorElementType::Bfloat16 => {
                        HostData::BF16(v.map(half::bf16::from_f32).collect())
                    }
                    other => bail!("cache '{}' has element type {other:?}", p.past),
                };
                block = Some(Host {
                    shape: shape.to_vec(),
                    data,
                });
            }
            let host = block.as_ref().context("cache block")?;
            pasts.push(self.to_device(host)?.into_dyn());
        }
        drop(block);
        let mut bufs = StepBuffers::default();
        let mut times = Vec::with_capacity(steps);
        for s in 0..steps {
            let b = batch as i64;
            let tokens: Vec<i64> = (0..b).map(|i| (i * 7 + s as i64) % 50).collect();
            let (rows, presents, mut t) =
                self.step(&mut bufs, &pasts, &tokens, batch, context + s)?;
            t.sampling = time_greedy(&rows);
            times.push(t);
            pasts = presents;
        }
        Ok(times)
    }

    /// Greedy decoding from an empty cache (to compare two models' logits): the prompt in one
    /// step, then `steps` steps of one token each. Returns the tokens picked and the logits each
    /// pick was made from (the prompt's last position, then each step).
    pub fn greedy(&mut self, prompt: &[i64], steps: usize) -> Result<(Vec<i64>, Vec<Vec<f32>>)> {
        ensure!(!prompt.is_empty(), "empty prompt");
        let mut pasts: Vec<DynValue> = Vec::new();
        for p in &self.pairs {
            let dtype = match p.dtype {
                TensorElementType::Float16 => "float16",
                TensorElementType::Bfloat16 => "bfloat16",
                _ => "float32",
            };
            let empty = Host::zeros(dtype, &[1, p.heads, 0, p.head_dim])?;
            pasts.push(self.to_device(&empty)?.into_dyn());
        }
        let mut bufs = StepBuffers::default();
        let (mut tokens, mut picked, mut logits) = (prompt.to_vec(), Vec::new(), Vec::new());
        let mut sampler = Sampler::new(Sampling::Greedy, 0);
        let mut len = 0;
        for _ in 0..=steps {
            let (rows, presents, _) = self.step(&mut bufs, &pasts, &tokens, 1, len)?;
            len += tokens.len();
            let last = rows.into_iter().last().context("no logits")?;
            let next = sampler.next(&last) as i64;
            picked.push(next);
            logits.push(last);
            tokens = vec![next];
            pasts = presents;
        }
        Ok((picked, logits))
    }

    /// One step of `tokens.len() / batch` new tokens per sequence after `past_len` cached ones:
    /// logits of every new position (one row each), the presents (the next step's pasts), and
    /// where the time went (sampling left at 0).
    fn step(
        &mut self,
        bufs: &mut StepBuffers,
        pasts: &[DynValue],
        tokens: &[i64],
        batch: usize,
        past_len: usize,
    ) -> Result<(Vec<Vec<f32>>, Vec<DynValue>, StepTimes)> {
        let t0 = Instant::now();
        let b = batch as i64;
        let s = (tokens.len() / batch.max(1)) as i64;
        let total = past_len as i64 + s;
        let mut binding = self
            .session
            .as_mut()
            .context(REOPEN_FAILED)?
            .create_binding()?;
        let ids = Host::i64(&[b, s], tokens.to_vec());
        self.feed(&mut bufs.input_ids, &ids)?;
        binding.bind_input(
            self.input_ids.as_str(),
            bufs.input_ids.as_ref().context("ids")?,
        )?;
        if let Some(name) = &self.position_ids {
            let pos = Host::i64(
                &[b, s],
                (0..b).flat_map(|_| past_len as i64..total).collect(),
            );
            self.feed(&mut bufs.position_ids, &pos)?;
            binding.bind_input(name.as_str(), bufs.position_ids.as_ref().context("pos")?)?;
        }
        if let Some(name) = &self.attention_mask {
            // Grows every step: a new buffer each time.
            let mask = Host::i64(&[b, total], vec![1; (b * total) as usize]);
            binding.bind_input(name.as_str(), &self.to_device(&mask)?)?;
        }
        for (p, v) in self.pairs.iter().zip(pasts) {
            binding.bind_input(p.past.as_str(), v)?;
            binding.bind_output_to_device(p.present.as_str(), &self.out_mem)?;
        }
        binding.bind_output_to_device(self.logits.as_str(), &self.out_mem)?;
        let t1 = Instant::now();
        let mut out = self
            .session
            .as_mut()
            .context(REOPEN_FAILED)?
            .run_binding(&binding)
            .context("stock decode step")?;
        let t2 = Instant::now();
        let value = &out[self.logits.as_str()];
        let logits = match &self.copier {
            Some(c) => {
                let t = value.view().downcast::<DynTensorValueType>()?;
                let shape = t.shape().to_vec();
                let host = match bufs.logits_host.take() {
                    Some(h) if h.shape == shape => h,
                    _ => Host::zeros(dtype_name(value.dtype())?, &shape)?,
                };
                let mut host = host;
                c.download(&t, &mut host)?;
                host
            }
            None => Host::from_ort(value)?,
        };
        let vocab = *logits.shape.last().context("logits rank")? as usize;
        let rows = logits.rows_f32(vocab);
        if self.copier.is_some() {
            bufs.logits_host = Some(logits);
        }
        let t3 = Instant::now();
        let presents = self
            .pairs
            .iter()
            .map(|p| {
                out.remove(p.present.as_str())
                    .with_context(|| format!("output {}", p.present))
            })
            .collect::<Result<_>>()?;
        Ok((rows, presents, StepTimes::between([t0, t1, t2, t3])))
    }

    /// Writes `host` into `slot`'s buffer, reusing it while the shape stays.
    fn feed(&self, slot: &mut Option<DynTensor>, host: &Host) -> Result<()> {
        if let (Some(t), Some(c)) = (slot.as_mut(), &self.copier) {
            if t.shape().to_vec() == host.shape {
                return c.upload(host, t);
            }
        }
        *slot = Some(self.to_device(host)?);
        Ok(())
    }

    /// A tensor holding `host` where the session runs (device memory on CUDA).
    fn to_device(&self, host: &Host) -> Result<DynTensor> {
        match &self.copier {
            Some(c) => c.to_device(host, &self.alloc),
            None => host.to_ort(&Allocator::default()),
        }
    }
}

const REOPEN_FAILED: &str = "the stock session failed to reopen after releasing its memory";

/// The session's allocator where it runs (the default CPU allocator on the CPU).
fn allocator(session: &Session, device: Device, mem: &MemoryInfo<'static>) -> Result<Allocator> {
    Ok(match device {
        Device::Cpu => Allocator::default(),
        Device::Cuda { .. } => Allocator::new(session, mem.clone())?,
    })
}

/// Per-step input buffers, reused while their shapes stay, and the host logits buffer.
#[derive(Default)]
struct StepBuffers {
    input_ids: Option<DynTensor>,
    position_ids: Option<DynTensor>,
    logits_host: Option<Host>,
}

fn dtype_name(v: &ValueType) -> Result<&'static str> {
    Ok(match v {
        ValueType::Tensor { ty, .. } => match ty {
            TensorElementType::Float32 => "float32",
            TensorElementType::Float16 => "float16",
            TensorElementType::Bfloat16 => "bfloat16",
            other => bail!("logits of element type {other:?}"),
        },
        other => bail!("logits are not a tensor: {other:?}"),
    })
}
