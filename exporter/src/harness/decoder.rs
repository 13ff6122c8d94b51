//! Stateful decoding of a rewritten model: per-sequence prefill, then batched steps with every
//! state, cache and cache-length tensor bound in place (one device buffer each, read and written
//! by the step), so no state tensor crosses to the host between tokens. On CUDA the token ids,
//! position ids and logits also stay in fixed device buffers, copied with plain CUDA copies
//! (`device_copy`) rather than ORT runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::IoBinding;
use ort::session::Session;

use ort::value::{DynTensor, ValueType};

use super::device_copy::DeviceCopy;
use super::runtime::{Device, Runtime};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::sampling::{Sampler, Sampling};
use super::stats::StepTimes;
use super::tensor::{Host, HostData};
use crate::manifest::{Manifest, StateTensor};

/// The rewritten prefill/decode pair with its state description.
pub struct PowerModel {
    pub manifest: Manifest,
    prefill: Session,
    /// The decode model with its dims as exported (dynamic batch); never CUDA-graph captured.
    decode: Session,
    decode_path: PathBuf,
    /// For the fixed-shape decode sessions ([`PowerModel::fixed_dims`]).
    rt: Runtime,
    /// Decode each batch in a session of its own with every dim fixed for it. On with CUDA
    /// graphs, which need it (each binding also gets its own capture); tests turn it on on CPU.
    pub fixed_shapes: bool,
    device: Device,
    /// CUDA copies for the per-step inputs and logits (with `--device cuda`).
    copier: Option<DeviceCopy>,
}

/// Logits for every prompt position (P × vocab), and the prefill's state outputs by manifest index.
pub type Prefilled = (Vec<Vec<f32>>, HashMap<usize, Host>);

/// Batched decoding buffers bound in place to the decode session. Every bound buffer keeps its
/// address for the whole decode, as CUDA-graph replay requires.
pub struct DecodeState {
    /// One buffer per state tensor of the manifest, in manifest order.
    buffers: Vec<DynTensor>,
    input_ids: DynTensor,
    position_ids: Option<DynTensor>,
    logits: DynTensor,
    /// Host sides of the per-step copies (token ids, position ids, logits in the model's dtype).
    ids_host: Host,
    positions_host: Host,
    logits_host: Host,
    binding: IoBinding,
    /// With fixed shapes (always with CUDA graphs): the decode session with every dim fixed for
    /// this batch, which the binding belongs to and any graph was captured in (else the model's
    /// own session runs).
    session: Option<Session>,
    pub batch: usize,
    /// Tokens seen so far per sequence (the next position id).
    pub lengths: Vec<i64>,
}

impl PowerModel {
    pub fn load(rt: &Runtime, dir: &Path, device: Device) -> Result<PowerModel> {
        let manifest = Manifest::read(dir)?;
        let prefill = rt.session(&dir.join(&manifest.prefill.file), device, false)?;
        let decode_path = dir.join(&manifest.decode.file);
        let decode = rt.session(&decode_path, device, false)?;
        let copier = match device {
            Device::Cpu => None,
            Device::Cuda { .. } => Some(DeviceCopy::new(0)?),
        };
        Ok(PowerModel {
            manifest,
            prefill,
            decode,
            decode_path,
            rt: rt.clone(),
            fixed_shapes: device.cuda_graph(),
            device,
            copier,
        })
    }

    /// Values for every symbolic dim of the decode model's inputs in steps of one token for a
    /// batch of `b`: token inputs are (b, 1), state tensors (b, ...). Exported graphs compute
    /// reshape targets from such dims at run time; fixed, ORT folds that arithmetic away.
    pub fn fixed_dims(&self, b: usize) -> Result<Vec<(String, i64)>> {
        let io = &self.manifest.decode;
        let mut dims: Vec<(String, i64)> = Vec::new();
        for input in self.decode.inputs() {
            let name = input.name();
            let ValueType::Tensor {
                dimension_symbols, ..
            } = input.dtype()
            else {
                continue;
            };
            let want: &[i64] = if name == io.input_ids || io.position_ids.as_deref() == Some(name) {
                &[b as i64, 1]
            } else if self.manifest.state.iter().any(|s| s.decode_input == name) {
                &[b as i64]
            } else {
                &[]
            };
            for (i, sym) in dimension_symbols.iter().enumerate() {
                if sym.is_empty() {
                    continue;
                }
                let Some(&v) = want.get(i) else {
                    bail!("decode input '{name}' has a symbolic dim '{sym}' (axis {i}) that a decode step cannot fix");
                };
                match dims.iter().find(|(s, _)| s == sym) {
                    Some((_, old)) if *old != v => bail!(
                        "decode model: dim '{sym}' is both {old} and {v} (axis {i} of '{name}'); it cannot be fixed for CUDA-graph replay"
                    ),
                    Some(_) => {}
                    None => dims.push((sym.clone(), v)),
                }
            }
        }
        Ok(dims)
    }

    /// Vocabulary size, from the decode model's logits shape.
    pub fn vocab_size(&self) -> Result<usize> {
        let out = self
            .decode
            .outputs()
            .iter()
            .find(|o| o.name() == self.manifest.decode.logits)
            .context("decode model has no logits output")?;
        match out.dtype() {
            ort::value::ValueType::Tensor { shape, .. } if shape.last().is_some_and(|&v| v > 0) => {
                Ok(shape[shape.len() - 1] as usize)
            }
            other => bail!("logits output has no fixed vocabulary dim ({other:?}); pass --prompt"),
        }
    }

    fn logits_dtype(&self) -> Result<String> {
        let out = self
            .decode
            .outputs()
            .iter()
            .find(|o| o.name() == self.manifest.decode.logits)
            .context("decode model has no logits output")?;
        Ok(match out.dtype() {
            ort::value::ValueType::Tensor {
                ty: ort::value::TensorElementType::Float16,
                ..
            } => "float16",
            ort::value::ValueType::Tensor {
                ty: ort::value::TensorElementType::Bfloat16,
                ..
            } => "bfloat16",
            _ => "float32",
        }
        .to_string())
    }

    /// Tolerance of the equal-work check: float32 logits agree to rounding; float16/bfloat16
    /// models round activations between layers, so prefill and decode differ more.
    pub fn check_tolerance(&self) -> f64 {
        let fp32 = self
            .decode
            .outputs()
            .iter()
            .find(|o| o.name() == self.manifest.decode.logits)
            .is_some_and(|o| {
                matches!(
                    o.dtype(),
                    ort::value::ValueType::Tensor {
                        ty: ort::value::TensorElementType::Float32,
                        ..
                    }
                )
            });
        if fp32 {
            1e-4
        } else {
            3e-2
        }
    }

    /// Bytes of state one sequence carries between tokens (every layer).
    pub fn state_bytes_per_sequence(&self) -> u64 {
        self.manifest
            .state
            .iter()
            .map(|s| s.bytes_per_sequence())
            .sum()
    }

    /// Runs the prefill model on one sequence; returns logits for every position (P × vocab) and the
    /// prefill's state outputs by manifest index.
    pub fn prefill_one(&mut self, tokens: &[i64]) -> Result<Prefilled> {
        let p = tokens.len() as i64;
        let io = &self.manifest.prefill;
        let mut feeds: Vec<(String, ort::session::SessionInputValue<'_>)> = vec![(
            io.input_ids.clone(),
            Host::i64(&[1, p], tokens.to_vec())
                .to_ort(&Allocator::default())?
                .into(),
        )];
        if let Some(name) = &io.position_ids {
            feeds.push((
                name.clone(),
                Host::i64(&[1, p], (0..p).collect())
                    .to_ort(&Allocator::default())?
                    .into(),
            ));
        }
        if let Some(name) = &io.attention_mask {
            feeds.push((
                name.clone(),
                Host::i64(&[1, p], vec![1; p as usize])
                    .to_ort(&Allocator::default())?
                    .into(),
            ));
        }
        let out = self.prefill.run(feeds).context("prefill run")?;
        let logits = Host::from_ort_anywhere(&out[io.logits.as_str()])?;
        let vocab = *logits.shape.last().context("logits rank")? as usize;
        let flat = logits.to_f32();
        let rows = flat.chunks(vocab).map(<[f32]>::to_vec).collect();
        let mut states = HashMap::new();
        for (i, s) in self.manifest.state.iter().enumerate() {
            if let Some(name) = &s.prefill_output {
                states.insert(
                    i,
                    Host::from_ort_anywhere(&out[name.as_str()])
                        .with_context(|| format!("prefill output {name}"))?,
                );
            }
        }
        Ok((rows, states))
    }

    /// Prefills each prompt separately (ragged lengths need no padding) and assembles the batch's
    /// decode buffers; returns the buffers and the last-position logits of each prompt.
    pub fn start(&mut self, prompts: &[Vec<i64>]) -> Result<(DecodeState, Vec<Vec<f32>>)> {
        let b = prompts.len();
        let mut batch: Vec<Host> = self
            .manifest
            .state
            .iter()
            .map(|s| Host::zeros(&s.dtype, &s.shape_for(b)))
            .collect::<Result<_>>()?;
        let mut last = Vec::with_capacity(b);
        for (bi, prompt) in prompts.iter().enumerate() {
            if prompt.is_empty() {
                bail!("prompt {bi} is empty: prefill needs at least one token");
            }
            let (logits, states) = self.prefill_one(prompt)?;
            last.push(
                logits
                    .last()
                    .cloned()
                    .context("prefill returned no logits")?,
            );
            for (i, host) in states {
                let per = host.numel();
                batch[i].write_at(bi * per, &host).with_context(|| {
                    format!("state tensor {}", self.manifest.state[i].decode_input)
                })?;
            }
        }
        let lengths = prompts.iter().map(|p| p.len() as i64).collect();
        Ok((self.bind(batch, lengths)?, last))
    }

    /// Uploads the batch's buffers and binds each as both input and output of the decode step.
    fn bind(&mut self, hosts: Vec<Host>, lengths: Vec<i64>) -> Result<DecodeState> {
        let b = lengths.len();
        let alloc = self.allocator()?;
        let buffers: Vec<DynTensor> = hosts
            .iter()
            .map(|h| self.to_device(h, &alloc))
            .collect::<Result<_>>()?;
        let graph = self.device.cuda_graph();
        // CUDA-graph capture needs every node on the GPU, so no shape arithmetic left to run on
        // the CPU, and it records this binding's addresses: a session of its own, with every dim
        // fixed for this batch.
        let session = if self.fixed_shapes || graph {
            let dims = self.fixed_dims(b)?;
            Some(
                self.rt
                    .session_with_dims(&self.decode_path, self.device, graph, &dims)
                    .with_context(|| format!("decode session with fixed dims {dims:?}"))?,
            )
        } else {
            None
        };
        let mut binding = session.as_ref().unwrap_or(&self.decode).create_binding()?;
        for (s, buf) in self.manifest.state.iter().zip(buffers.iter()) {
            binding.bind_input(s.decode_input.as_str(), buf)?;
        }
        let io = &self.manifest.decode;
        // On CUDA the token ids, position ids and logits live in device buffers bound once, at fixed
        // addresses (as CUDA-graph replay requires), and each step copies into and out of them;
        // on the CPU, host tensors written in place.
        let token_alloc = if self.copier.is_some() {
            alloc
        } else {
            Allocator::default()
        };
        let tokens = Host::i64(&[b as i64, 1], vec![0; b]);
        let input_ids = self.to_device(&tokens, &token_alloc)?;
        binding.bind_input(io.input_ids.as_str(), &input_ids)?;
        let position_ids = match &io.position_ids {
            Some(name) => {
                let t = self.to_device(&tokens, &token_alloc)?;
                binding.bind_input(name.as_str(), &t)?;
                Some(t)
            }
            None => None,
        };
        let logits_host = Host::zeros(
            &self.logits_dtype()?,
            &[b as i64, 1, self.vocab_size()? as i64],
        )?;
        let logits = logits_host.alloc_like(&token_alloc)?;
        let mut state = DecodeState {
            session,
            buffers,
            input_ids,
            position_ids,
            logits,
            ids_host: tokens.clone(),
            positions_host: tokens,
            logits_host,
            binding,
            batch: b,
            lengths,
        };
        for (s, buf) in self.manifest.state.iter().zip(state.buffers.iter_mut()) {
            // The same buffer as input and output: the step updates it in place.
            state
                .binding
                .bind_output(s.decode_output.as_str(), &mut *buf)?;
        }
        state
            .binding
            .bind_output(io.logits.as_str(), &mut state.logits)?;
        if graph {
            // ORT runs the model several times inside the first Run with CUDA graphs enabled
            // (warm-up, capture, replay): capture now, then put the state back as it was.
            state
                .session
                .as_mut()
                .context("no fixed-shape decode session")?
                .run_binding(&state.binding)
                .context("capture the decode step in a CUDA graph")?;
            for (h, buf) in hosts.iter().zip(state.buffers.iter_mut()) {
                self.upload(h, buf)?;
            }
        }
        Ok(state)
    }

    /// One decode step: feeds one new token per sequence, returns each sequence's logits and
    /// where the time went (`sampling` is left at 0: the caller samples).
    pub fn step(
        &mut self,
        st: &mut DecodeState,
        tokens: &[i64],
    ) -> Result<(Vec<Vec<f32>>, StepTimes)> {
        let t0 = Instant::now();
        ensure!(
            tokens.len() == st.batch,
            "{} tokens for a batch of {}",
            tokens.len(),
            st.batch
        );
        let b = st.batch as i64;
        let io = &self.manifest.decode;
        st.ids_host.data = HostData::I64(tokens.to_vec());
        st.positions_host.data = HostData::I64(st.lengths.clone());
        self.upload(&st.ids_host, &mut st.input_ids)?;
        if let Some(pos) = st.position_ids.as_mut() {
            self.upload(&st.positions_host, pos)?;
        }
        if self.copier.is_none() {
            // Host tensors updated in place: rebinding makes ORT take the new values.
            st.binding
                .bind_input(io.input_ids.as_str(), &st.input_ids)?;
            if let (Some(name), Some(pos)) = (&io.position_ids, &st.position_ids) {
                st.binding.bind_input(name.as_str(), pos)?;
            }
        }
        if let Some(name) = &io.attention_mask {
            if self.device.cuda_graph() {
                bail!("the decode model takes '{name}', whose shape grows every step: CUDA-graph replay needs fixed shapes");
            }
            let total = st.lengths.iter().max().copied().unwrap_or(0) + 1;
            st.binding.bind_input(
                name.as_str(),
                &Host::i64(&[b, total], vec![1; (b * total) as usize])
                    .to_ort(&Allocator::default())?,
            )?;
        }
        let t1 = Instant::now();
        st.session
            .as_mut()
            .unwrap_or(&mut self.decode)
            .run_binding(&st.binding)
            .context("decode step")?;
        let t2 = Instant::now();
        match &self.copier {
            Some(c) => c.download(&st.logits, &mut st.logits_host)?,
            None => st.logits_host = Host::from_tensor(&st.logits)?,
        }
        let vocab = *st.logits_host.shape.last().context("logits rank")? as usize;
        let rows = st.logits_host.rows_f32(vocab);
        for l in st.lengths.iter_mut() {
            *l += 1;
        }
        Ok((rows, StepTimes::between([t0, t1, t2, Instant::now()])))
    }

    /// Decode buffers as after `context` tokens of history: random state values of realistic size
    /// and a window filled to `context mod C` (for timing; a step's cost does not depend on values).
    pub fn start_synthetic(
        &mut self,
        batch: usize,
        context: usize,
        seed: u64,
    ) -> Result<DecodeState> {
        let mut rng = StdRng::seed_from_u64(seed);
        let fill = (context as i64).rem_euclid(self.manifest.cache_capacity.max(1));
        let mut hosts = Vec::with_capacity(self.manifest.state.len());
        for s in &self.manifest.state {
            let mut h = Host::zeros(&s.dtype, &s.shape_for(batch))?;
            match (&mut h.data, s.role.as_str()) {
                (HostData::I64(v), _) => v.iter_mut().for_each(|x| *x = fill),
                // Sums of expanded keys stay positive so every denominator is.
                (HostData::F32(v), "sum_of_keys") => {
                    v.iter_mut().for_each(|x| *x = rng.random_range(0.5..1.0))
                }
                (HostData::F32(v), "log_gate_cache") => v.iter_mut().for_each(|x| *x = -0.01),
                (HostData::F32(v), _) => {
                    v.iter_mut().for_each(|x| *x = rng.random_range(-0.1..0.1))
                }
                (HostData::F16(v), _) => v
                    .iter_mut()
                    .for_each(|x| *x = half::f16::from_f32(rng.random_range(-1.0..1.0))),
                (HostData::BF16(v), _) => v
                    .iter_mut()
                    .for_each(|x| *x = half::bf16::from_f32(rng.random_range(-1.0..1.0))),
            }
            hosts.push(h);
        }
        self.bind(hosts, vec![context as i64; batch])
    }

    /// Times `steps` decode steps from a synthetic history of `context` tokens, each followed by
    /// greedy sampling (timed, not fed back: the tokens fed are fixed).
    pub fn time_steps(
        &mut self,
        batch: usize,
        context: usize,
        steps: usize,
        seed: u64,
    ) -> Result<Vec<StepTimes>> {
        let mut st = self.start_synthetic(batch, context, seed)?;
        let tokens: Vec<i64> = (0..batch as i64).map(|i| i % 7).collect();
        let mut times = Vec::with_capacity(steps);
        for _ in 0..steps {
            let (logits, mut t) = self.step(&mut st, &tokens)?;
            t.sampling = time_greedy(&logits);
            times.push(t);
        }
        Ok(times)
    }

    /// Writes `h` into `buf` in place: a CUDA copy on CUDA, a host write on the CPU.
    fn upload(&self, h: &Host, buf: &mut DynTensor) -> Result<()> {
        match &self.copier {
            Some(c) => c.upload(h, buf),
            None => h.upload(buf),
        }
    }

    /// A device buffer holding `h` (through `DeviceCopy` on CUDA), or a host tensor.
    fn to_device(&self, h: &Host, alloc: &Allocator) -> Result<DynTensor> {
        match &self.copier {
            Some(c) if !alloc.memory_info().is_cpu_accessible() => c.to_device(h, alloc),
            _ => h.to_ort(alloc),
        }
    }

    fn allocator(&self) -> Result<Allocator> {
        Ok(match self.device {
            Device::Cpu => Allocator::default(),
            Device::Cuda { .. } => Allocator::new(
                &self.decode,
                MemoryInfo::new(
                    AllocationDevice::CUDA,
                    0,
                    AllocatorType::Device,
                    MemoryType::Default,
                )?,
            )?,
        })
    }
}

/// Seconds to pick each row's greedy token (what `bench` charges per step for sampling).
pub fn time_greedy(rows: &[Vec<f32>]) -> f64 {
    let mut sampler = Sampler::new(Sampling::Greedy, 0);
    let t = Instant::now();
    let picked: usize = rows.iter().map(|r| sampler.next(r)).sum();
    std::hint::black_box(picked);
    t.elapsed().as_secs_f64()
}

impl StateTensor {
    /// The shape for a batch of `b` (the manifest writes the batch dim as -1).
    pub fn shape_for(&self, b: usize) -> Vec<i64> {
        self.shape
            .iter()
            .map(|&d| if d < 0 { b as i64 } else { d })
            .collect()
    }

    pub fn bytes_per_sequence(&self) -> u64 {
        let n: i64 = self
            .shape
            .iter()
            .map(|&d| if d < 0 { 1 } else { d })
            .product();
        let each = match self.dtype.as_str() {
            "float16" | "bfloat16" => 2,
            "int64" => 8,
            _ => 4,
        };
        n as u64 * each
    }
}
