//! `RegisterCustomOps`, the `OrtCustomOp` entries derived from the op table (every op × model
//! dtype × execution provider), and the callbacks ORT makes into them.

use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use ort_sys::{
    ONNXTensorElementDataType, OrtApi, OrtApiBase, OrtCustomOp,
    OrtCustomOpInputOutputCharacteristic, OrtErrorCode, OrtKernelContext, OrtKernelInfo,
    OrtMemType, OrtSessionOptions, OrtShapeInferContext, OrtStatusPtr,
};

use super::api::{api, check, make_status, ort_type, set_api, string_from, REQUIRED_API};
use super::context::ComputeContext;
use super::kernel_info::KernelInfo;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ops::{Ep, Kernel};
use crate::schema::{ElemType, OpSchema, PortType, DOMAIN, MODEL_TYPES, SCHEMAS};

/// One registered kernel: `base` must stay first so ORT's `*const OrtCustomOp` is our entry.
#[repr(C)]
struct OpEntry {
    base: OrtCustomOp,
    op: &'static OpSchema,
    elem: ElemType,
    ep: Ep,
    name: CString,
    ep_name: CString,
}

struct Entries(Vec<&'static OpEntry>);
// SAFETY: entries are immutable after construction and live for the process (leaked).
unsafe impl Send for Entries {}
// SAFETY: as above.
unsafe impl Sync for Entries {}

static ENTRIES: OnceLock<Entries> = OnceLock::new();

fn entries() -> &'static [&'static OpEntry] {
    &ENTRIES
        .get_or_init(|| {
            let mut v = Vec::new();
            for ep in Ep::available() {
                for op in SCHEMAS {
                    for elem in MODEL_TYPES {
                        v.push(&*Box::leak(Box::new(new_entry(op, elem, ep))));
                    }
                }
            }
            Entries(v)
        })
        .0
}

fn new_entry(op: &'static OpSchema, elem: ElemType, ep: Ep) -> OpEntry {
    OpEntry {
        base: OrtCustomOp {
            version: REQUIRED_API,
            CreateKernel: None,
            GetName: Some(get_name),
            GetExecutionProviderType: Some(get_ep),
            GetInputType: Some(get_input_type),
            GetInputTypeCount: Some(get_input_count),
            GetOutputType: Some(get_output_type),
            GetOutputTypeCount: Some(get_output_count),
            KernelCompute: None,
            KernelDestroy: Some(kernel_destroy),
            GetInputCharacteristic: Some(get_input_characteristic),
            GetOutputCharacteristic: Some(get_output_characteristic),
            GetInputMemoryType: Some(get_input_memory_type),
            GetVariadicInputMinArity: None,
            GetVariadicInputHomogeneity: None,
            GetVariadicOutputMinArity: None,
            GetVariadicOutputHomogeneity: None,
            CreateKernelV2: Some(create_kernel),
            KernelComputeV2: Some(kernel_compute),
            InferOutputShapeFn: Some(infer_shape),
            GetStartVersion: None,
            GetEndVersion: None,
            GetMayInplace: if op.aliases.is_empty() {
                None
            } else {
                Some(step_may_inplace)
            },
            ReleaseMayInplace: if op.aliases.is_empty() {
                None
            } else {
                Some(release_may_inplace)
            },
            GetAliasMap: None,
            ReleaseAliasMap: None,
        },
        op,
        elem,
        ep,
        name: CString::new(op.name).expect("op names have no NUL"),
        ep_name: CString::new(ep.provider_name()).expect("EP names have no NUL"),
    }
}

/// # Safety
/// `op` must be one of our entries (ORT passes back the pointer we registered).
unsafe fn entry<'a>(op: *const OrtCustomOp) -> &'a OpEntry {
    // SAFETY: OpEntry is repr(C) with `base` first, and ORT only calls us with our own pointers.
    unsafe { &*(op as *const OpEntry) }
}

fn port_type(ty: PortType, elem: ElemType) -> ONNXTensorElementDataType {
    ort_type(ty.resolve(elem))
}

fn characteristic(optional: bool) -> OrtCustomOpInputOutputCharacteristic {
    if optional {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
    } else {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
    }
}

unsafe extern "system" fn get_name(op: *const OrtCustomOp) -> *const c_char {
    // SAFETY: ORT passes one of our entries.
    unsafe { entry(op) }.name.as_ptr()
}

unsafe extern "system" fn get_ep(op: *const OrtCustomOp) -> *const c_char {
    // SAFETY: as above.
    unsafe { entry(op) }.ep_name.as_ptr()
}

unsafe extern "system" fn get_input_type(
    op: *const OrtCustomOp,
    i: usize,
) -> ONNXTensorElementDataType {
    // SAFETY: as above.
    let e = unsafe { entry(op) };
    e.op.inputs.get(i).map_or(
        ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
        |p| port_type(p.ty, e.elem),
    )
}

unsafe extern "system" fn get_output_type(
    op: *const OrtCustomOp,
    i: usize,
) -> ONNXTensorElementDataType {
    // SAFETY: as above.
    let e = unsafe { entry(op) };
    e.op.outputs.get(i).map_or(
        ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
        |p| port_type(p.ty, e.elem),
    )
}

unsafe extern "system" fn get_input_count(op: *const OrtCustomOp) -> usize {
    // SAFETY: as above.
    unsafe { entry(op) }.op.inputs.len()
}

unsafe extern "system" fn get_output_count(op: *const OrtCustomOp) -> usize {
    // SAFETY: as above.
    unsafe { entry(op) }.op.outputs.len()
}

unsafe extern "system" fn get_input_characteristic(
    op: *const OrtCustomOp,
    i: usize,
) -> OrtCustomOpInputOutputCharacteristic {
    // SAFETY: as above.
    characteristic(
        unsafe { entry(op) }
            .op
            .inputs
            .get(i)
            .is_some_and(|p| p.optional),
    )
}

unsafe extern "system" fn get_output_characteristic(
    op: *const OrtCustomOp,
    i: usize,
) -> OrtCustomOpInputOutputCharacteristic {
    // SAFETY: as above.
    characteristic(
        unsafe { entry(op) }
            .op
            .outputs
            .get(i)
            .is_some_and(|p| p.optional),
    )
}

unsafe extern "system" fn get_input_memory_type(_op: *const OrtCustomOp, _i: usize) -> OrtMemType {
    // Every input lives where the kernel runs (device memory for CUDA kernels), so a decode step
    // has no host inputs and can be captured in a CUDA graph.
    OrtMemType::OrtMemTypeDefault
}

struct InplacePairs {
    inputs: Vec<c_int>,
    outputs: Vec<c_int>,
}

/// The step op's in-place pairs, from the op table. `GetMayInplace` has no op argument, so only
/// the step op (the one op with aliases) points at this function.
fn step_pairs() -> &'static InplacePairs {
    static PAIRS: OnceLock<InplacePairs> = OnceLock::new();
    PAIRS.get_or_init(|| {
        let op = SCHEMAS
            .iter()
            .find(|op| !op.aliases.is_empty())
            .expect("the step op has in-place pairs");
        InplacePairs {
            inputs: op.aliases.iter().map(|&(i, _)| i as c_int).collect(),
            outputs: op.aliases.iter().map(|&(_, o)| o as c_int).collect(),
        }
    })
}

unsafe extern "system" fn step_may_inplace(
    input_index: *mut *mut c_int,
    output_index: *mut *mut c_int,
) -> usize {
    let p = step_pairs();
    // SAFETY: ORT passes valid out pointers; the arrays are process-lifetime statics that ORT only
    // reads, and ReleaseMayInplace below does not free them.
    unsafe {
        *input_index = p.inputs.as_ptr() as *mut c_int;
        *output_index = p.outputs.as_ptr() as *mut c_int;
    }
    p.inputs.len()
}

unsafe extern "system" fn release_may_inplace(_input_index: *mut c_int, _output_index: *mut c_int) {
    // The arrays are statics owned by this library.
}

/// The state of one kernel instance (one node).
struct KernelState {
    kernel: Kernel,
    node: String,
}

/// Runs `f`, turning an `Err` or a panic into an ORT error status that names the node.
fn guard(node: &str, f: impl FnOnce() -> Result<()>) -> OrtStatusPtr {
    let result = catch_unwind(AssertUnwindSafe(f));
    let (code, msg) = match result {
        Ok(Ok(())) => return OrtStatusPtr(std::ptr::null_mut()),
        Ok(Err(e)) => {
            let code = match e {
                Error::Runtime { .. } | Error::Cuda { .. } => OrtErrorCode::ORT_RUNTIME_EXCEPTION,
                Error::Unsupported { .. } => OrtErrorCode::ORT_NOT_IMPLEMENTED,
                _ => OrtErrorCode::ORT_INVALID_ARGUMENT,
            };
            (code, e.to_string())
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            (
                OrtErrorCode::ORT_FAIL,
                format!("internal error (please report): {what}"),
            )
        }
    };
    let prefix = if node.is_empty() {
        format!("[{DOMAIN}] ")
    } else {
        format!("[{DOMAIN}] node '{node}': ")
    };
    make_status(api(), code, &format!("{prefix}{msg}"))
}

unsafe extern "system" fn create_kernel(
    op: *const OrtCustomOp,
    _api: *const OrtApi,
    info: *const OrtKernelInfo,
    kernel: *mut *mut c_void,
) -> OrtStatusPtr {
    // SAFETY: ORT passes one of our entries.
    let e = unsafe { entry(op) };
    // SAFETY: info is valid for the duration of this call, and KernelInfo does not escape it.
    let info = unsafe { KernelInfo::new(info, e.op.name) };
    let node = info.node_name();
    guard(&node, || {
        let cfg = Config::from_attributes(e.op, &info)?;
        let mut wired = info.outputs_wired()?;
        wired.resize(e.op.outputs.len(), false);
        let state = Box::new(KernelState {
            kernel: Kernel {
                op: e.op,
                elem: e.elem,
                ep: e.ep,
                cfg,
                outputs_wired: wired,
            },
            node: node.clone(),
        });
        // SAFETY: `kernel` is ORT's out pointer; ownership of the box passes to ORT until
        // KernelDestroy hands it back.
        unsafe { *kernel = Box::into_raw(state) as *mut c_void };
        Ok(())
    })
}

unsafe extern "system" fn kernel_compute(
    kernel: *mut c_void,
    ctx: *mut OrtKernelContext,
) -> OrtStatusPtr {
    // SAFETY: `kernel` is the box created in create_kernel; compute may run concurrently on it,
    // and KernelState is immutable after creation.
    let state = unsafe { &*(kernel as *const KernelState) };
    guard(&state.node, || {
        // SAFETY: ctx is this call's kernel context; the ComputeContext dies with this closure.
        let mut c = unsafe { ComputeContext::new(state.kernel.op, ctx) }?;
        crate::ops::compute(&state.kernel, &mut c)
    })
}

unsafe extern "system" fn kernel_destroy(kernel: *mut c_void) {
    if !kernel.is_null() {
        // SAFETY: the pointer came from Box::into_raw in create_kernel and is destroyed once.
        drop(unsafe { Box::from_raw(kernel as *mut KernelState) });
    }
}

unsafe extern "system" fn infer_shape(
    op: *const OrtCustomOp,
    ctx: *mut OrtShapeInferContext,
) -> OrtStatusPtr {
    // SAFETY: ORT passes one of our entries.
    let e = unsafe { entry(op) };
    // SAFETY: ctx is valid for this call.
    guard("", || unsafe {
        super::shape_infer::infer(e.op, e.elem, ctx)
    })
}

/// The library's entry point: registers both ops in domain `power_retention` on `options`.
///
/// # Safety
/// Called by ONNX Runtime with a live `OrtSessionOptions` and its `OrtApiBase`.
#[no_mangle]
pub unsafe extern "C" fn RegisterCustomOps(
    options: *mut OrtSessionOptions,
    api_base: *const OrtApiBase,
) -> OrtStatusPtr {
    if api_base.is_null() || options.is_null() {
        return OrtStatusPtr(std::ptr::null_mut());
    }
    // SAFETY: api_base is ORT's static base table.
    let base = unsafe { &*api_base };
    // SAFETY: GetApi returns null for versions the runtime does not have.
    let api_ptr = unsafe { (base.GetApi)(REQUIRED_API) };
    if api_ptr.is_null() {
        // SAFETY: version strings are static NUL-terminated strings; API 1 exists in every runtime.
        let version = unsafe { string_from((base.GetVersionString)()) };
        // SAFETY: as above.
        let old = unsafe { (base.GetApi)(1) };
        if old.is_null() {
            return OrtStatusPtr(std::ptr::null_mut());
        }
        // SAFETY: a non-null API table of the runtime.
        let old = unsafe { &*old };
        return make_status(
            old,
            OrtErrorCode::ORT_FAIL,
            &format!("[{DOMAIN}] this custom-op library needs ONNX Runtime API {REQUIRED_API} (ONNX Runtime ≥ 1.{REQUIRED_API}); the loaded runtime is {version}"),
        );
    }
    // SAFETY: non-null API table, static in ORT.
    set_api(unsafe { &*api_ptr });
    let result = catch_unwind(|| register_domain(options));
    match result {
        Ok(Ok(())) => OrtStatusPtr(std::ptr::null_mut()),
        Ok(Err(msg)) => make_status(
            api(),
            OrtErrorCode::ORT_FAIL,
            &format!("[{DOMAIN}] registration failed: {msg}"),
        ),
        Err(_) => make_status(
            api(),
            OrtErrorCode::ORT_FAIL,
            &format!("[{DOMAIN}] registration panicked"),
        ),
    }
}

fn register_domain(options: *mut OrtSessionOptions) -> std::result::Result<(), String> {
    let api = api();
    let name = CString::new(DOMAIN).expect("domain has no NUL");
    let mut domain = std::ptr::null_mut();
    // SAFETY: name outlives the call; domain is a valid out pointer. The domain is never released:
    // ORT requires it to outlive every session created from these options.
    check(unsafe { (api.CreateCustomOpDomain)(name.as_ptr(), &mut domain) })?;
    for e in entries() {
        // SAFETY: entries are leaked statics, valid for the process.
        check(unsafe { (api.CustomOpDomain_Add)(domain, &e.base) })?;
    }
    // SAFETY: options is the live session options ORT passed to RegisterCustomOps.
    check(unsafe { (api.AddCustomOpDomain)(options, domain) })
}
