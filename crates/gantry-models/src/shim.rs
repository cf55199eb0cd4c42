//! Calling the C++ shim (`kernels.cpp`).
//!
//! C++ exceptions must not unwind into Rust, so every shim function that can fail catches
//! them and reports failure the C way: a null result (or -1), with a NUL-terminated message
//! written into a buffer the caller lends it (`snprintf`, so truncated to the buffer's length).
//! [`ShimError`] is that buffer; [`new_tensor`] wraps the calls that return a new tensor.

use std::ffi::{CStr, c_char};

use tch::Tensor;
use torch_sys::C_tensor;

/// The message buffer a shim call fills when it fails.
pub(crate) struct ShimError {
    buffer: [c_char; 512],
}

impl ShimError {
    pub(crate) fn new() -> Self {
        Self { buffer: [0; 512] }
    }

    /// The `(error, error_len)` pair every fallible shim function takes last.
    pub(crate) fn buffer(&mut self) -> (*mut c_char, usize) {
        (self.buffer.as_mut_ptr(), self.buffer.len())
    }

    /// What the shim wrote, up to its NUL (all of the buffer if a misbehaving callee left it
    /// unterminated, so reading never runs past it).
    pub(crate) fn message(&self) -> String {
        let bytes: Vec<u8> = self.buffer.iter().map(|&c| c as u8).collect();
        match CStr::from_bytes_until_nul(&bytes) {
            Ok(text) => text.to_string_lossy().into_owned(),
            Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
        }
    }
}

/// Runs `call`, a shim function that returns a new heap-allocated `at::Tensor` (whose
/// ownership passes to the returned [`Tensor`]) or null after writing its reason into the
/// buffer it is given.
///
/// # Panics
/// On null, with `what` and the shim's message, as tch's own operators panic on a libtorch
/// error.
///
/// # Safety
/// `call` must uphold the contract above, and every tensor pointer it passes must stay live
/// for the call.
pub(crate) unsafe fn new_tensor(
    what: &str,
    call: impl FnOnce(*mut c_char, usize) -> *mut C_tensor,
) -> Tensor {
    let mut error = ShimError::new();
    let (buffer, len) = error.buffer();
    let out = call(buffer, len);
    if out.is_null() {
        panic!("{what}: {}", error.message());
    }
    // SAFETY: non-null, so a new at::Tensor owned by nobody else (the caller's contract).
    unsafe { Tensor::from_ptr(out) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_ends_at_its_nul_or_at_the_end_of_the_buffer() {
        let mut error = ShimError::new();
        assert_eq!(error.message(), "");
        for (slot, byte) in error.buffer.iter_mut().zip(b"bad input\0tail") {
            *slot = *byte as c_char;
        }
        assert_eq!(error.message(), "bad input");
        error.buffer.fill(b'x' as c_char);
        assert_eq!(error.message(), "x".repeat(512));
    }
}
