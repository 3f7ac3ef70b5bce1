//! Finding and loading the NCCL library, and the table of the NCCL entry points Kiln calls.
//!
//! Kiln opens NCCL itself (with `libloading`) instead of through `cudarc`'s loader, which
//! never tries `libnccl.so.2`: the only name the torch wheel (`site-packages/nvidia/nccl/lib`),
//! NGC containers and the Debian/Ubuntu `libnccl2` package install. `cudarc` still provides
//! NCCL's types (`ncclComm_t`, `ncclUniqueId`, ...), and the CUDA driver.
//!
//! # Search order
//!
//! 1. `KILN_NCCL_LIBRARY`, when set: that file and nothing else (a wrong path is an error, not
//!    a silent fall back to another NCCL).
//! 2. `libnccl.so.2`, then `libnccl.so`, by name: the dynamic loader's search (an NCCL this
//!    process already loaded, e.g. through libtorch_cuda, then `LD_LIBRARY_PATH`, the rpath,
//!    the `ld.so` cache), which finds system packages and containers' NCCL.
//! 3. Beside the libtorch this process loaded (found in `/proc/self/maps`):
//!    `<torch/lib>/../../nvidia/nccl/lib/libnccl.so.2`, the torch wheel's layout (torch 2.11's
//!    CUDA 13 wheels keep NCCL there; `nvidia/cu13/lib` holds the CUDA libraries, no NCCL).
//!
//! When none loads, the error lists every place tried and why each failed. The library, once
//! loaded, stays loaded for the life of the process.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nccl::sys::{
    cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId,
};

/// The environment variable naming the NCCL library file to load.
pub const NCCL_LIBRARY_ENV: &str = "KILN_NCCL_LIBRARY";

/// One place to look for NCCL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidate {
    /// The file named by `KILN_NCCL_LIBRARY`.
    Explicit(PathBuf),
    /// A file name for the dynamic loader's search.
    Name(&'static str),
    /// A file beside the loaded libtorch.
    BesideTorch(PathBuf),
}

impl Candidate {
    fn describe(&self) -> String {
        match self {
            Candidate::Explicit(p) => format!("{NCCL_LIBRARY_ENV}={}", p.display()),
            Candidate::Name(n) => format!("{n} (LD_LIBRARY_PATH, rpath, ld.so cache)"),
            Candidate::BesideTorch(p) => format!("{} (beside libtorch)", p.display()),
        }
    }
}

/// The places to look, in order (see the module docs): `explicit` is the value of
/// `KILN_NCCL_LIBRARY`, `torch_lib` the directory of the loaded libtorch.
pub fn candidates(explicit: Option<OsString>, torch_lib: Option<&Path>) -> Vec<Candidate> {
    if let Some(p) = explicit.filter(|p| !p.is_empty()) {
        return vec![Candidate::Explicit(PathBuf::from(p))];
    }
    let mut out = vec![
        Candidate::Name("libnccl.so.2"),
        Candidate::Name("libnccl.so"),
    ];
    if let Some(dir) = torch_lib {
        out.push(Candidate::BesideTorch(
            dir.join("../../nvidia/nccl/lib/libnccl.so.2"),
        ));
    }
    out
}

/// The directory of the `libtorch_cpu.so` mapped into this process, from the text of
/// `/proc/self/maps`.
pub fn torch_lib_dir(maps: &str) -> Option<PathBuf> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(Path::new)
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libtorch_cpu.so"))
        })
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

type Status = ncclResult_t;

/// The NCCL entry points Kiln uses, from one loaded library.
pub struct Api {
    /// The file the library was loaded from, as the dynamic loader opened it.
    pub path: PathBuf,
    /// `ncclGetVersion`, e.g. 22809 for 2.28.9.
    pub version: i32,
    pub get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> Status,
    pub comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> Status,
    pub all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        cudaStream_t,
    ) -> Status,
    pub broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        c_int,
        ncclComm_t,
        cudaStream_t,
    ) -> Status,
    pub reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        c_int,
        ncclComm_t,
        cudaStream_t,
    ) -> Status,
    pub reduce_scatter: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        cudaStream_t,
    ) -> Status,
    pub all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclComm_t,
        cudaStream_t,
    ) -> Status,
    pub group_start: unsafe extern "C" fn() -> Status,
    pub group_end: unsafe extern "C" fn() -> Status,
    pub comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut Status) -> Status,
    pub comm_abort: unsafe extern "C" fn(ncclComm_t) -> Status,
    pub comm_destroy: unsafe extern "C" fn(ncclComm_t) -> Status,
    pub get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    pub get_last_error: unsafe extern "C" fn(ncclComm_t) -> *const c_char,
    /// Keeps the library mapped while the function pointers above are in use.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("path", &self.path)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The NCCL library of this process, loaded on first use from [`candidates`] (the
/// environment and the loaded libtorch); the outcome is kept for the life of the process.
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let torch = torch_lib_dir(&maps);
        load(&candidates(
            std::env::var_os(NCCL_LIBRARY_ENV),
            torch.as_deref(),
        ))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Loads the first of `candidates` that opens and has every entry point; the error lists
/// every candidate tried and why it failed.
pub fn load(candidates: &[Candidate]) -> Result<Api, String> {
    let mut tried = Vec::new();
    for c in candidates {
        match open(c) {
            Ok(api) => return Ok(api),
            Err(why) => tried.push(format!("{}: {why}", c.describe())),
        }
    }
    Err(format!(
        "cannot load the NCCL library (tried {}): install NCCL 2.28 (the nvidia-nccl-cu13 \
         wheel that torch installs, an NGC container, or the libnccl2 package) or set \
         {NCCL_LIBRARY_ENV} to the path of libnccl.so.2",
        if tried.is_empty() {
            "nothing".to_string()
        } else {
            tried.join("; ")
        }
    ))
}

/// The text of a `libloading` error with its cause (`dlerror`'s message).
fn load_error(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => cause.to_string(),
        None => e.to_string(),
    }
}

fn open(c: &Candidate) -> Result<Api, String> {
    let lib = match c {
        Candidate::Explicit(p) | Candidate::BesideTorch(p) => {
            if !p.exists() {
                return Err("no such file".into());
            }
            // SAFETY: loading NCCL runs its initializers, which only set up NCCL's own state;
            // Kiln loads no other library under this name with different contents.
            unsafe { libloading::Library::new(p) }
        }
        // SAFETY: as above.
        Candidate::Name(n) => unsafe { libloading::Library::new(*n) },
    }
    .map_err(|e| load_error(&e))?;
    /// Looks up `name` as a function of type `T`.
    ///
    /// SAFETY: the caller names a function NCCL 2.x exports with exactly the signature `T`
    /// (those of `nccl.h`, as `cudarc::nccl::sys` declares them).
    unsafe fn sym<T: Copy>(lib: &libloading::Library, name: &str) -> Result<T, String> {
        lib.get::<T>(name).map(|s| *s).map_err(|e| {
            format!(
                "not an NCCL library ({name} is missing: {})",
                load_error(&e)
            )
        })
    }
    // SAFETY: every name below is an NCCL 2.x entry point with the signature of the field it
    // fills (`nccl.h`); the pointers stay valid while `_lib` keeps the library loaded.
    let api = unsafe {
        let get_version: unsafe extern "C" fn(*mut c_int) -> Status = sym(&lib, "ncclGetVersion")?;
        let mut version: c_int = 0;
        let status = get_version(&mut version);
        if status != ncclResult_t::ncclSuccess {
            return Err(format!("ncclGetVersion failed: {status:?}"));
        }
        let path = loaded_path(get_version as *const c_void).unwrap_or_else(|| match c {
            Candidate::Explicit(p) | Candidate::BesideTorch(p) => p.clone(),
            Candidate::Name(n) => PathBuf::from(n),
        });
        Api {
            path,
            version,
            get_unique_id: sym(&lib, "ncclGetUniqueId")?,
            comm_init_rank: sym(&lib, "ncclCommInitRank")?,
            all_reduce: sym(&lib, "ncclAllReduce")?,
            broadcast: sym(&lib, "ncclBroadcast")?,
            reduce: sym(&lib, "ncclReduce")?,
            reduce_scatter: sym(&lib, "ncclReduceScatter")?,
            all_gather: sym(&lib, "ncclAllGather")?,
            group_start: sym(&lib, "ncclGroupStart")?,
            group_end: sym(&lib, "ncclGroupEnd")?,
            comm_get_async_error: sym(&lib, "ncclCommGetAsyncError")?,
            comm_abort: sym(&lib, "ncclCommAbort")?,
            comm_destroy: sym(&lib, "ncclCommDestroy")?,
            get_error_string: sym(&lib, "ncclGetErrorString")?,
            get_last_error: sym(&lib, "ncclGetLastError")?,
            _lib: lib,
        }
    };
    Ok(api)
}

/// The file of the loaded object that holds `addr`, as the dynamic loader opened it (a link's
/// name stays a link's name).
fn loaded_path(addr: *const c_void) -> Option<PathBuf> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: `info` is a valid out pointer; `dladdr` only reads the loader's tables.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: `dli_fname` is a NUL-terminated string owned by the loader, valid while the
    // object stays loaded (it is never unloaded: see `api`); copied at once.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_library_is_the_only_candidate() {
        let c = candidates(
            Some("/opt/nccl/libnccl.so.2".into()),
            Some(Path::new("/t/lib")),
        );
        assert_eq!(c, [Candidate::Explicit("/opt/nccl/libnccl.so.2".into())]);
        let c = candidates(Some("".into()), Some(Path::new("/v/torch/lib")));
        assert_eq!(
            c,
            [
                Candidate::Name("libnccl.so.2"),
                Candidate::Name("libnccl.so"),
                Candidate::BesideTorch("/v/torch/lib/../../nvidia/nccl/lib/libnccl.so.2".into()),
            ]
        );
        assert_eq!(candidates(None, None).len(), 2);
    }

    #[test]
    fn libtorch_is_found_in_the_process_maps() {
        let maps = "\
7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6
7f10-7f20 r--p 00000000 08:01 2 /venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so
7f20-7f30 rw-p 00000000 00:00 0
";
        assert_eq!(
            torch_lib_dir(maps),
            Some(PathBuf::from(
                "/venv/lib/python3.11/site-packages/torch/lib"
            ))
        );
        assert_eq!(
            torch_lib_dir("7f20-7f30 rw-p 00000000 00:00 0 [heap]\n"),
            None
        );
    }

    #[test]
    fn a_missing_library_names_every_place_tried() {
        let err = load(&[
            Candidate::Explicit("/nonexistent/libnccl.so.2".into()),
            Candidate::Name("libkiln-no-such-nccl.so.2"),
        ])
        .unwrap_err();
        assert!(
            err.contains("KILN_NCCL_LIBRARY=/nonexistent/libnccl.so.2: no such file"),
            "{err}"
        );
        assert!(
            err.contains("libkiln-no-such-nccl.so.2 (LD_LIBRARY_PATH"),
            "{err}"
        );
        assert!(err.contains("install NCCL 2.28"), "{err}");
    }
}
