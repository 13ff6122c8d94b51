//! ORT's shape-inference callback, answered from the op table (ORT ignores errors returned
//! here, so the kernels validate again at compute time).

use std::ffi::{c_char, c_void, CString};
use std::sync::atomic::{AtomicU64, Ordering};

use ort_sys::{OrtOpAttrType, OrtShapeInferContext};

use super::api::{api, check, ort_type, release, string_from};
use crate::error::Result;
use crate::schema::{AttrValue, ElemType, OpSchema, PortType};
use crate::shapes::{infer_output_shapes, DimExpr};

/// # Safety
/// `ctx` must be the live shape-inference context ORT passed to `InferOutputShapeFn`.
pub unsafe fn infer(
    op: &'static OpSchema,
    elem: ElemType,
    ctx: *mut OrtShapeInferContext,
) -> Result<()> {
    let api = api();
    let mut count = 0usize;
    // SAFETY: ctx is live; count is a valid out pointer.
    if check(unsafe { (api.ShapeInferContext_GetInputCount)(ctx, &mut count) }).is_err() {
        return Ok(());
    }
    // ORT builds one schema per op name from the first overload, so the model dtype T must be
    // read from the node's inputs, not from the entry this callback belongs to.
    let mut t = None;
    let mut inputs: Vec<Option<Vec<DimExpr>>> = Vec::with_capacity(op.inputs.len());
    for i in 0..op.inputs.len() {
        if i >= count {
            inputs.push(None);
            continue;
        }
        let mut info = std::ptr::null_mut();
        // SAFETY: i < count; the returned info is owned by the context (never released here).
        let st = unsafe { (api.ShapeInferContext_GetInputTypeShape)(ctx, i, &mut info) };
        if check(st).is_err() || info.is_null() {
            inputs.push(None);
            continue;
        }
        if op.inputs[i].ty == PortType::T {
            let mut code =
                ort_sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
            // SAFETY: info is live for the callback; code is a valid out pointer.
            if check(unsafe { (api.GetTensorElementType)(info, &mut code) }).is_ok() {
                t = t.or(ElemType::from_onnx_code(code as i32));
            }
        }
        // SAFETY: info is live for the callback.
        inputs.push(unsafe { read_dims(info) });
    }
    let deg = read_int_attr(op, ctx, "deg");
    for (o, dims) in infer_output_shapes(op, deg.max(0) as usize, &inputs)
        .into_iter()
        .enumerate()
    {
        // Without a typed input (no shape info) ORT's own type inference stands for T outputs.
        let Some(ty) = (match op.outputs[o].ty {
            PortType::T => t,
            other => Some(other.resolve(elem)),
        }) else {
            continue;
        };
        // SAFETY: ctx is live; write_output creates and releases its own info.
        unsafe { write_output(ctx, o, ty, &dims) };
    }
    Ok(())
}

/// # Safety
/// `info` must be a live tensor type-and-shape info.
unsafe fn read_dims(info: *mut ort_sys::OrtTensorTypeAndShapeInfo) -> Option<Vec<DimExpr>> {
    let api = api();
    let mut n = 0usize;
    // SAFETY: info is live (caller); buffers sized by the count.
    unsafe {
        check((api.GetDimensionsCount)(info, &mut n)).ok()?;
        let mut dims = vec![0i64; n];
        check((api.GetDimensions)(info, dims.as_mut_ptr(), n)).ok()?;
        let mut syms: Vec<*const c_char> = vec![std::ptr::null(); n];
        check((api.GetSymbolicDimensions)(info, syms.as_mut_ptr(), n)).ok()?;
        Some(
            dims.iter()
                .zip(&syms)
                .map(|(&d, &s)| {
                    let name = string_from(s);
                    if d >= 0 {
                        DimExpr::Known(d)
                    } else if !name.is_empty() {
                        DimExpr::Symbolic(name)
                    } else {
                        DimExpr::Unknown
                    }
                })
                .collect(),
        )
    }
}

fn read_int_attr(op: &OpSchema, ctx: *mut OrtShapeInferContext, name: &str) -> i64 {
    let default = match op.attribute(name).map(|a| a.default) {
        Some(AttrValue::Int(v)) => v,
        _ => 0,
    };
    let api = api();
    let c = CString::new(name).expect("attribute names have no NUL");
    let mut attr = std::ptr::null();
    // SAFETY: ctx is live; c outlives the call; attr is owned by the context.
    let st = unsafe { (api.ShapeInferContext_GetAttribute)(ctx, c.as_ptr(), &mut attr) };
    if check(st).is_err() || attr.is_null() {
        return default;
    }
    let mut v = 0i64;
    let mut size = 0usize;
    // SAFETY: v has room for one int64, as `len` says.
    let st = unsafe {
        (api.ReadOpAttr)(
            attr,
            OrtOpAttrType::ORT_OP_ATTR_INT,
            &mut v as *mut i64 as *mut c_void,
            std::mem::size_of::<i64>(),
            &mut size,
        )
    };
    match check(st) {
        Ok(()) => v,
        Err(_) => default,
    }
}

static UNKNOWN: AtomicU64 = AtomicU64::new(0);

/// # Safety
/// `ctx` must be live.
unsafe fn write_output(ctx: *mut OrtShapeInferContext, o: usize, ty: ElemType, dims: &[DimExpr]) {
    let api = api();
    let mut info = std::ptr::null_mut();
    // SAFETY: info is created here and released at the end.
    if check(unsafe { (api.CreateTensorTypeAndShapeInfo)(&mut info) }).is_err() {
        return;
    }
    let values: Vec<i64> = dims
        .iter()
        .map(|d| if let DimExpr::Known(v) = d { *v } else { -1 })
        .collect();
    // ORT turns a nameless -1 into the dim *value* -1; an unknown dim needs a fresh symbol.
    let names: Vec<CString> = dims
        .iter()
        .map(|d| {
            let name = match d {
                DimExpr::Known(_) => String::new(),
                DimExpr::Symbolic(s) => s.replace('\0', " "),
                DimExpr::Unknown => format!(
                    "power_retention_unk_{}",
                    UNKNOWN.fetch_add(1, Ordering::Relaxed)
                ),
            };
            CString::new(name).expect("NULs replaced")
        })
        .collect();
    let mut ptrs: Vec<*const c_char> = names.iter().map(|s| s.as_ptr()).collect();
    let code = ort_type(ty);
    // SAFETY: info is live; the arrays outlive the calls; an output the node does not wire makes
    // SetOutputTypeShape fail, which is fine to ignore.
    unsafe {
        let ok = check((api.SetTensorElementType)(info, code)).is_ok()
            && check((api.SetDimensions)(info, values.as_ptr(), values.len())).is_ok()
            && check((api.SetSymbolicDimensions)(
                info,
                ptrs.as_mut_ptr(),
                ptrs.len(),
            ))
            .is_ok();
        if ok {
            release((api.ShapeInferContext_SetOutputTypeShape)(ctx, o, info));
        }
        (api.ReleaseTensorTypeAndShapeInfo)(info);
    }
}
