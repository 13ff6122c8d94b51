//! What ORT tells a kernel when it is created: attributes, node name, wired outputs.

use std::ffi::{c_char, CString};

use ort_sys::OrtKernelInfo;

use super::api::{api, check, release};
use crate::config::AttributeSource;
use crate::error::{Error, Result};

/// A borrowed `OrtKernelInfo`, valid during `CreateKernel`.
pub struct KernelInfo {
    raw: *const OrtKernelInfo,
    op: &'static str,
}

impl KernelInfo {
    /// # Safety
    /// `raw` must be the kernel info ORT passed to `CreateKernelV2`, used only during that call.
    pub unsafe fn new(raw: *const OrtKernelInfo, op: &'static str) -> Self {
        KernelInfo { raw, op }
    }

    fn name_query(
        &self,
        f: unsafe extern "system" fn(
            *const OrtKernelInfo,
            usize,
            *mut c_char,
            *mut usize,
        ) -> ort_sys::OrtStatusPtr,
        i: usize,
    ) -> Result<String> {
        let mut size = 0usize;
        // SAFETY: a null buffer asks ORT for the required size (including the NUL).
        check(unsafe { f(self.raw, i, std::ptr::null_mut(), &mut size) })
            .map_err(|m| self.err(m))?;
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: buf has `size` bytes, as ORT asked for.
        check(unsafe { f(self.raw, i, buf.as_mut_ptr().cast(), &mut size) })
            .map_err(|m| self.err(m))?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// Which outputs the node wires (an omitted optional output has an empty name).
    pub fn outputs_wired(&self) -> Result<Vec<bool>> {
        let mut n = 0usize;
        // SAFETY: raw is valid during CreateKernel; `n` is a valid out pointer.
        check(unsafe { (api().KernelInfo_GetOutputCount)(self.raw, &mut n) })
            .map_err(|m| self.err(m))?;
        (0..n)
            .map(|i| {
                self.name_query(api().KernelInfo_GetOutputName, i)
                    .map(|s| !s.is_empty())
            })
            .collect()
    }

    pub fn node_name(&self) -> String {
        let mut size = 0usize;
        // SAFETY: null buffer = size query, as documented for KernelInfo_GetNodeName.
        if check(unsafe {
            (api().KernelInfo_GetNodeName)(self.raw, std::ptr::null_mut(), &mut size)
        })
        .is_err()
        {
            return String::new();
        }
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: buf holds `size` bytes.
        if check(unsafe {
            (api().KernelInfo_GetNodeName)(self.raw, buf.as_mut_ptr().cast(), &mut size)
        })
        .is_err()
        {
            return String::new();
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }

    fn err(&self, message: String) -> Error {
        Error::Runtime {
            op: self.op,
            message,
        }
    }
}

impl AttributeSource for KernelInfo {
    fn int(&self, name: &str) -> Result<Option<i64>> {
        let c = CString::new(name).expect("attribute names come from the op table");
        let mut v = 0i64;
        // SAFETY: raw is valid during CreateKernel; c and v outlive the call.
        let st = unsafe { (api().KernelInfoGetAttribute_int64)(self.raw, c.as_ptr(), &mut v) };
        if st.0.is_null() {
            return Ok(Some(v));
        }
        // A missing attribute is reported as an error status; the op table supplies the default.
        release(st);
        if self.has_float(&c) {
            return Err(Error::Attribute {
                op: self.op,
                name: leak_name(name),
                expected: "an int".into(),
                got: "a float".into(),
            });
        }
        Ok(None)
    }

    fn float(&self, name: &str) -> Result<Option<f32>> {
        let c = CString::new(name).expect("attribute names come from the op table");
        let mut v = 0f32;
        // SAFETY: as in `int`.
        let st = unsafe { (api().KernelInfoGetAttribute_float)(self.raw, c.as_ptr(), &mut v) };
        if st.0.is_null() {
            return Ok(Some(v));
        }
        release(st);
        let mut i = 0i64;
        // SAFETY: as in `int`.
        let st = unsafe { (api().KernelInfoGetAttribute_int64)(self.raw, c.as_ptr(), &mut i) };
        if st.0.is_null() {
            return Err(Error::Attribute {
                op: self.op,
                name: leak_name(name),
                expected: "a float".into(),
                got: format!("the int {i}"),
            });
        }
        release(st);
        Ok(None)
    }
}

impl KernelInfo {
    fn has_float(&self, c: &CString) -> bool {
        let mut v = 0f32;
        // SAFETY: as in `int`.
        let st = unsafe { (api().KernelInfoGetAttribute_float)(self.raw, c.as_ptr(), &mut v) };
        let ok = st.0.is_null();
        release(st);
        ok
    }
}

/// Attribute names in errors are 'static; they come from the op table, so find them there.
fn leak_name(name: &str) -> &'static str {
    crate::schema::SCHEMAS
        .iter()
        .flat_map(|op| op.attributes.iter())
        .find(|a| a.name == name)
        .map_or("<attribute>", |a| a.name)
}
