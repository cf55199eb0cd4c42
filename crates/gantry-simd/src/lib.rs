//! Element-wise host loops compiled for the widest vector instructions the CPU has.
//!
//! Gantry's release build targets baseline x86-64 (SSE2), so a plain loop runs four floats at
//! a time even on a CPU with AVX-512. [`widest!`] compiles one loop three times (AVX-512F,
//! AVX2, the baseline) and picks at run time. The loops it wraps must be element-wise IEEE
//! arithmetic: Rust never contracts `a * b + c` into a fused multiply-add, so every version
//! computes the same bits and only the vector width differs. The optimiser's passes and the
//! shared-memory all-reduce's sums use it.

/// `fn $name(args) -> ret` that calls `$kernel(args)` (an `#[inline(always)]` function)
/// compiled for AVX-512F where the CPU has it, else for AVX2, else for the baseline.
#[macro_export]
macro_rules! widest {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $kernel:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $kernel($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $kernel($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $kernel($($arg),*)
        }
    };
}
