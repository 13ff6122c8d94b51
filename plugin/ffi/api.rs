//! The `OrtApi` table and status conversions.

use std::ffi::{c_char, CStr, CString};
use std::sync::OnceLock;

use ort_sys::{OrtApi, OrtErrorCode, OrtStatusPtr};

/// The API level this library is compiled against (ORT ≥ 1.22); older runtimes are refused.
pub const REQUIRED_API: u32 = 22;

struct ApiRef(&'static OrtApi);
// SAFETY: the OrtApi table is an immutable static of the ORT library, valid for the process.
unsafe impl Send for ApiRef {}
// SAFETY: as above; it is only read.
unsafe impl Sync for ApiRef {}

static API: OnceLock<ApiRef> = OnceLock::new();

/// Remembers the runtime's API table (the first registration wins; it is a process-wide static).
pub fn set_api(api: &'static OrtApi) {
    let _ = API.set(ApiRef(api));
}

/// The API table. Callbacks only run after `RegisterCustomOps` set it.
pub fn api() -> &'static OrtApi {
    API.get()
        .expect("ORT callbacks run only after RegisterCustomOps stored the API table")
        .0
}

/// Converts an ORT status into `Err(message)`, releasing it.
pub fn check(status: OrtStatusPtr) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = api();
    // SAFETY: status is a live, non-null OrtStatus returned by ORT; the message pointer is valid
    // until the status is released, and we copy it before releasing.
    unsafe {
        let msg = CStr::from_ptr((api.GetErrorMessage)(status.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(status.0);
        Err(msg)
    }
}

/// Releases a status we do not need to read (an expected "not found", say).
pub fn release(status: OrtStatusPtr) {
    let _ = check(status);
}

/// Makes an ORT status carrying `msg` (interior NULs are replaced).
pub fn make_status(api: &OrtApi, code: OrtErrorCode, msg: &str) -> OrtStatusPtr {
    let c = CString::new(msg.replace('\0', " ")).expect("NULs were replaced");
    // SAFETY: CreateStatus copies the message; `c` outlives the call.
    unsafe { (api.CreateStatus)(code, c.as_ptr()) }
}

/// Reads a NUL-terminated C string into an owned String.
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string valid for the duration of the call.
pub unsafe fn string_from(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The C enum value of an element type.
pub fn ort_type(t: crate::schema::ElemType) -> ort_sys::ONNXTensorElementDataType {
    use crate::schema::ElemType;
    use ort_sys::ONNXTensorElementDataType as D;
    match t {
        ElemType::F32 => D::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
        ElemType::F16 => D::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
        ElemType::BF16 => D::ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16,
        ElemType::I64 => D::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
    }
}
