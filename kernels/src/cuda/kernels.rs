//! [`CudaKernels`]: the kernel modules compiled for one device and a launch
//! method per kernel. Every method checks its inputs with [`super::launch`]
//! before anything reaches the device, and queues its work on the backend's
//! stream (callers synchronise when they read results back).
//!
//! Block tables travel from the host on every attention call; keeping them
//! on the device belongs to the device-resident KV pool (not built yet).

use super::launch::{self, Launch, PrefillSeq};
use super::sources::{self, KernelSource};
use super::{driver_err, nvrtc};
use crate::attention::{BatchRow, KvElem, KvGeometry};
use crate::KernelError;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

impl From<Launch> for LaunchConfig {
    fn from(l: Launch) -> Self {
        LaunchConfig { grid_dim: l.grid, block_dim: l.block, shared_mem_bytes: l.shared_bytes }
    }
}

/// A KV element the attention kernels read: f32 or bf16 (the sealed
/// [`KvElem`] has no other).
pub trait CudaKvElem: KvElem + DeviceRepr {}
impl<T: KvElem + DeviceRepr> CudaKvElem for T {}

/// One attention call over one layer of a paged pool on the device.
#[derive(Debug, Clone, Copy)]
pub struct PagedArgs {
    pub geometry: KvGeometry,
    pub layer: usize,
    /// Usually `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// The kernels of one device, compiled and loaded.
#[derive(Debug)]
pub struct CudaKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: &'static str,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    silu_mul: CudaFunction,
    decode_f32: CudaFunction,
    decode_bf16: CudaFunction,
    prefill_f32: CudaFunction,
    prefill_bf16: CudaFunction,
}

impl CudaKernels {
    /// Opens CUDA device `ordinal` (see [`crate::device::cuda_context`]) and
    /// compiles every kernel for it.
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        Self::with_context(crate::device::cuda_context(ordinal)?)
    }

    /// Compiles every kernel for the device of `ctx`, on a new stream.
    pub fn with_context(ctx: Arc<CudaContext>) -> Result<Self, KernelError> {
        let (major, minor) = ctx.compute_capability().map_err(driver_err("compute capability"))?;
        let arch = nvrtc::arch_for(major, minor)?;
        let stream = ctx.new_stream().map_err(driver_err("stream creation"))?;
        let load = |src: &KernelSource| -> Result<Vec<CudaFunction>, KernelError> {
            let module = ctx.load_module(nvrtc::compile(src, arch)?).map_err(driver_err("module load"))?;
            src.entry_points.iter().map(|e| module.load_function(e).map_err(driver_err("function lookup"))).collect()
        };
        let one = |src: &KernelSource| -> Result<CudaFunction, KernelError> {
            load(src)?.pop().ok_or_else(|| KernelError::Unavailable(format!("{} has no entry point", src.name)))
        };
        let two = |src: &KernelSource| -> Result<(CudaFunction, CudaFunction), KernelError> {
            match <[CudaFunction; 2]>::try_from(load(src)?) {
                Ok([a, b]) => Ok((a, b)),
                Err(_) => Err(KernelError::Unavailable(format!("{} should have two entry points", src.name))),
            }
        };
        let (decode_f32, decode_bf16) = two(&sources::PAGED_DECODE)?;
        let (prefill_f32, prefill_bf16) = two(&sources::PAGED_PREFILL)?;
        Ok(Self {
            rms_norm: one(&sources::RMS_NORM)?,
            rope: one(&sources::ROPE)?,
            silu_mul: one(&sources::SWIGLU)?,
            decode_f32,
            decode_bf16,
            prefill_f32,
            prefill_bf16,
            ctx,
            stream,
            arch,
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The PTX target the kernels were compiled for.
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// RMSNorm of each row of `x` (rows of `weight.len()`) into `out`.
    pub fn rms_norm(
        &self,
        x: &CudaView<'_, f32>,
        weight: &CudaView<'_, f32>,
        eps: f32,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        let dim = weight.len();
        if dim == 0 || !x.len().is_multiple_of(dim) || out.len() != x.len() {
            return Err(KernelError::Shape(format!(
                "rms_norm: x {} / weight {dim} / out {} floats",
                x.len(),
                out.len()
            )));
        }
        if x.is_empty() {
            return Ok(());
        }
        let cfg = launch::rms_norm(x.len() / dim, dim)?;
        let dim = launch::to_u32(dim, "rms_norm dim")?;
        let mut b = self.stream.launch_builder(&self.rms_norm);
        b.arg(x).arg(weight).arg(out).arg(&dim).arg(&eps);
        // SAFETY: the arguments match `tandem_rms_norm_f32(const float*,
        // const float*, float*, unsigned, float)`; x and out hold whole rows
        // of `dim`, one block per row, as checked above.
        unsafe { b.launch(cfg.into()) }.map_err(driver_err("rms_norm launch"))?;
        Ok(())
    }

    /// RoPE in place on `x` (`rows × heads × head_dim`), "rotate half",
    /// with per-row tables `cos`, `sin` (`rows × head_dim/2`).
    pub fn rope(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        cos: &CudaView<'_, f32>,
        sin: &CudaView<'_, f32>,
        rows: usize,
        head_dim: usize,
    ) -> Result<(), KernelError> {
        let half = head_dim / 2;
        let overflow = || KernelError::Shape("rope: rows × head_dim overflows".into());
        let table = rows.checked_mul(half).ok_or_else(overflow)?;
        let heads_len = rows.checked_mul(head_dim).ok_or_else(overflow)?;
        if heads_len == 0 || cos.len() != table || sin.len() != table || !x.len().is_multiple_of(heads_len) {
            return Err(KernelError::Shape(format!(
                "rope: x {} floats, cos {} / sin {} for {rows} rows of head_dim {head_dim}",
                x.len(),
                cos.len(),
                sin.len()
            )));
        }
        let heads = x.len() / heads_len;
        let cfg = launch::rope(rows, heads, head_dim)?;
        let (r, h, d) =
            (launch::to_u32(rows, "rows")?, launch::to_u32(heads, "heads")?, launch::to_u32(head_dim, "head_dim")?);
        let mut b = self.stream.launch_builder(&self.rope);
        b.arg(x).arg(cos).arg(sin).arg(&r).arg(&h).arg(&d);
        // SAFETY: the arguments match `tandem_rope_f32(float*, const float*,
        // const float*, unsigned, unsigned, unsigned)`; x holds rows × heads
        // × head_dim floats and each table rows × head_dim/2 (checked above).
        unsafe { b.launch(cfg.into()) }.map_err(driver_err("rope launch"))?;
        Ok(())
    }

    /// SwiGLU in place: `gate = silu(gate) * up`.
    pub fn silu_mul(&self, gate: &mut CudaViewMut<'_, f32>, up: &CudaView<'_, f32>) -> Result<(), KernelError> {
        if gate.len() != up.len() {
            return Err(KernelError::Shape(format!("silu_mul: gate {} vs up {}", gate.len(), up.len())));
        }
        if gate.is_empty() {
            return Ok(());
        }
        let cfg = launch::elementwise(gate.len())?;
        let n = gate.len() as u64;
        let mut b = self.stream.launch_builder(&self.silu_mul);
        b.arg(gate).arg(up).arg(&n);
        // SAFETY: the arguments match `tandem_silu_mul_f32(float*, const
        // float*, unsigned long long)`; both hold n floats.
        unsafe { b.launch(cfg.into()) }.map_err(driver_err("silu_mul launch"))?;
        Ok(())
    }

    fn pick<T: CudaKvElem>(&self, what: &'static str) -> Result<(&CudaFunction, &CudaFunction), KernelError> {
        match T::NAME {
            "f32" => Ok((&self.decode_f32, &self.prefill_f32)),
            "bf16" => Ok((&self.decode_bf16, &self.prefill_bf16)),
            other => Err(KernelError::Unavailable(format!("{what}: no CUDA kernel for {other} KV"))),
        }
    }

    /// Decode attention for every row of a batch over one layer of the
    /// device pool: `out[r][h] = softmax(q[r][h] · Kᵀ · scale) · V` over
    /// tokens `0..rows[r].context_len`, query head `h` reading KV head
    /// `h / group`. `q` and `out` are `rows × heads × head_dim`.
    pub fn paged_decode<T: CudaKvElem>(
        &self,
        q: &CudaView<'_, f32>,
        pool: &CudaView<'_, T>,
        args: &PagedArgs,
        rows: &[BatchRow<'_>],
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (func, _) = self.pick::<T>("paged_decode")?;
        let plan = launch::plan_decode(q.len(), out.len(), pool.len(), &args.geometry, args.layer, rows)?;
        let tables = self.upload(&plan.tables.tables)?;
        let starts = self.upload(&plan.tables.starts)?;
        let lens = self.upload(&plan.context_lens)?;
        let p = &plan.pool;
        let mut b = self.stream.launch_builder(func);
        b.arg(q).arg(pool).arg(&tables).arg(&starts).arg(&lens).arg(out);
        b.arg(&plan.heads).arg(&p.kv_heads).arg(&p.head_dim).arg(&p.page_tokens).arg(&p.num_layers).arg(&p.layer);
        b.arg(&args.scale);
        // SAFETY: the arguments match `tandem_paged_decode_{f32,bf16}`;
        // `plan_decode` checked q/out against rows × heads × head_dim, the
        // pool against whole pages, and that every table covers its context
        // with pages inside the pool, so every read and write is in bounds.
        unsafe { b.launch(plan.launch.into()) }.map_err(driver_err("paged_decode launch"))?;
        Ok(())
    }

    /// Chunked causal prefill attention over one layer of the device pool:
    /// each sequence's new rows (in `q`, sequences back to back) attend to
    /// its cached tokens and to its new tokens up to themselves. The new
    /// tokens' K/V must already be in the pool.
    pub fn paged_prefill<T: CudaKvElem>(
        &self,
        q: &CudaView<'_, f32>,
        pool: &CudaView<'_, T>,
        args: &PagedArgs,
        seqs: &[PrefillSeq<'_>],
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let (_, func) = self.pick::<T>("paged_prefill")?;
        let plan = launch::plan_prefill(q.len(), out.len(), pool.len(), &args.geometry, args.layer, seqs)?;
        let tables = self.upload(&plan.tables.tables)?;
        let starts = self.upload(&plan.tables.starts)?;
        let q_starts = self.upload(&plan.q_starts)?;
        let q_lens = self.upload(&plan.q_lens)?;
        let cached = self.upload(&plan.cached_lens)?;
        let p = &plan.pool;
        let mut b = self.stream.launch_builder(func);
        b.arg(q).arg(pool).arg(&tables).arg(&starts).arg(&q_starts).arg(&q_lens).arg(&cached).arg(out);
        b.arg(&plan.heads).arg(&p.kv_heads).arg(&p.head_dim).arg(&p.page_tokens).arg(&p.num_layers).arg(&p.layer);
        b.arg(&args.scale);
        // SAFETY: the arguments match `tandem_paged_prefill_{f32,bf16}`;
        // `plan_prefill` checked q/out against the sequences' rows × heads ×
        // head_dim, the pool against whole pages, and that every table
        // covers cached + new tokens with pages inside the pool.
        unsafe { b.launch(plan.launch.into()) }.map_err(driver_err("paged_prefill launch"))?;
        Ok(())
    }

    fn upload(&self, v: &[u32]) -> Result<CudaSlice<u32>, KernelError> {
        self.stream.clone_htod(v).map_err(driver_err("host-to-device copy"))
    }
}
