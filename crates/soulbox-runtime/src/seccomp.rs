//! The seccomp filter every sandbox process runs under (installed by PID 1 right before it
//! execs the agent; inherited by everything the agent starts, and irremovable).
//!
//! A deny-list: the sandbox is a general-purpose Linux box (compilers, package managers,
//! browsers, debuggers), so everything is allowed except kernel interfaces that no sandbox
//! needs and that have a record of privilege escalations or namespace escapes. Most of them
//! would already fail for lack of a host capability (sandbox root holds capabilities only in
//! its own user namespace); the filter removes the kernel code paths behind them from reach,
//! so a bug in a permission check does not matter. `docs/threat-model.md` has the table with
//! the reason for each entry; `build.rs` builds the filter.
//!
//! Built with libseccomp at build time (the reference implementation: it validates the architecture and
//! handles x32 and the i386 compat ABI, which hand-written or other generated BPF tends to get
//! wrong). Only the native x86_64/aarch64 ABI is allowed: a syscall through another ABI (e.g.
//! `int 0x80`) kills the process, because compat entry points are a classic source of
//! kernel bugs and sandboxed code has no need for 32-bit binaries.

use crate::RuntimeError;

/// The BPF program `build.rs` made: an array of `struct sock_filter` in native byte order.
static BPF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp.bpf"));

/// The filter as instructions, for `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub(crate) fn program() -> Result<Vec<libc::sock_filter>, RuntimeError> {
    let size = size_of::<libc::sock_filter>();
    if BPF.is_empty() || !BPF.len().is_multiple_of(size) || BPF.len() / size > usize::from(u16::MAX)
    {
        return Err(RuntimeError::Unsupported(format!(
            "seccomp filter: unexpected BPF size {}",
            BPF.len()
        )));
    }
    Ok(BPF
        .chunks_exact(size)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_filter_fits() {
        let prog = program().expect("filter");
        // Dozens of rules; the kernel's limit is 4096 instructions per filter.
        assert!(prog.len() > 100 && prog.len() < 4096, "{}", prog.len());
    }
}
