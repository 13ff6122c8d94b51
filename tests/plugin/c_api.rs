//! Loading through ONNX Runtime's C API directly (the `OrtApi` table, as a C or C++ host would):
//! `RegisterCustomOpsLibrary_V2`, and `RegisterCustomOpsUsingFunction` after the host loaded the
//! library itself. A session that uses both ops is created either way.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};

use ort::AsPointer;
use ort_sys::{OrtSession, OrtSessionOptions, OrtStatusPtr};
use power_retention_ort::schema::{ElemType, POWER_RETENTION, POWER_RETENTION_STEP};

use crate::common::*;

fn check(st: OrtStatusPtr) -> Result<(), String> {
    if st.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status from ORT; the message is copied before the status is released.
    unsafe {
        let msg = CStr::from_ptr((api.GetErrorMessage)(st.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(st.0);
        Err(msg)
    }
}

/// Creates a session of `model` on options prepared by `register`; releases everything.
fn create_session(
    register: impl Fn(*mut OrtSessionOptions) -> Result<(), String>,
    model: &[u8],
) -> Result<(), String> {
    let env = env(); // loads ONNX Runtime before the API table is used
    let _one_at_a_time = creation_lock();
    let api = ort::api();
    let mut opts: *mut OrtSessionOptions = std::ptr::null_mut();
    // SAFETY: plain C API calls with valid out pointers; every object is released below.
    unsafe {
        check((api.CreateSessionOptions)(&mut opts))?;
        let result = register(opts).and_then(|()| {
            let mut sess: *mut OrtSession = std::ptr::null_mut();
            check((api.CreateSessionFromArray)(
                env.ptr(),
                model.as_ptr().cast(),
                model.len(),
                opts,
                &mut sess,
            ))?;
            (api.ReleaseSession)(sess);
            Ok(())
        });
        (api.ReleaseSessionOptions)(opts);
        result
    }
}

fn models() -> [Vec<u8>; 2] {
    let t = ElemType::BF16;
    [
        one_node_model(
            &POWER_RETENTION,
            &all_ports(POWER_RETENTION.inputs, t),
            &all_ports(POWER_RETENTION.outputs, t),
            &[],
        ),
        one_node_model(
            &POWER_RETENTION_STEP,
            &all_ports(POWER_RETENTION_STEP.inputs, t),
            &all_ports(POWER_RETENTION_STEP.outputs, t),
            &[],
        ),
    ]
}

#[test]
fn c_api_register_custom_ops_library_v2_loads_both_ops() {
    let path = CString::new(plugin_path().to_string_lossy().as_bytes()).unwrap();
    for model in models() {
        create_session(
            |opts| {
                // SAFETY: opts is live; path outlives the call.
                check(unsafe { (ort::api().RegisterCustomOpsLibrary_V2)(opts, path.as_ptr()) })
            },
            &model,
        )
        .expect("session via RegisterCustomOpsLibrary_V2");
    }
    // Without the library the same model is refused: the ops really come from it.
    let err = create_session(|_| Ok(()), &models()[0]).unwrap_err();
    assert!(err.contains("PowerRetention"), "{err}");
}

#[test]
fn c_api_register_custom_ops_using_function_after_the_host_loaded_the_library() {
    // SAFETY: loading our own library; RTLD_GLOBAL makes RegisterCustomOps visible to ORT's dlsym.
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some(plugin_path()),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
        )
    }
    .expect("dlopen plugin");
    let name = CString::new("RegisterCustomOps").unwrap();
    for model in models() {
        create_session(
            |opts| {
                // SAFETY: opts is live; name outlives the call.
                check(unsafe { (ort::api().RegisterCustomOpsUsingFunction)(opts, name.as_ptr()) })
            },
            &model,
        )
        .expect("session via RegisterCustomOpsUsingFunction");
    }
    std::mem::forget(lib);
}
