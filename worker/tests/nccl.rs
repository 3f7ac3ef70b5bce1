//! The NCCL backend: the conformance suite on a CUDA device when one is present (NCCL runs one
//! rank per GPU, so a one-GPU machine checks world size 1; multi-rank behaviour is checked on
//! the TCP backend, which passes the same suite), and the availability probe everywhere.

use kiln_worker::collective::nccl::library::{self, Candidate};
use kiln_worker::collective::nccl::{nccl_library, nccl_version, NcclComm};
use kiln_worker::collective::tcp::TcpRing;
use kiln_worker::collective::{conformance, Collective, CollectiveError, ReduceOp};
use tch::{Device, Kind, Tensor};

#[test]
fn nccl_backend_passes_the_conformance_suite_at_world_size_1() {
    if !NcclComm::available() {
        println!("skipped: no CUDA device or no loadable NCCL on this machine");
        return;
    }
    let comm = NcclComm::from_tcp(&TcpRing::single(0), 0).expect("NCCL communicator");
    assert_eq!((comm.rank(), comm.size()), (0, 1));
    let cases = conformance::run(&comm, Device::Cuda(0), 1).expect("conformance");
    assert!(cases > 0);

    // CPU tensors belong to the TCP backend: a clear error, and the communicator still works.
    let cpu = Tensor::ones([4], (Kind::Float, Device::Cpu));
    match comm.all_reduce(&cpu, ReduceOp::Sum) {
        Err(CollectiveError::Invalid(msg)) => assert!(msg.contains("CUDA"), "{msg}"),
        other => panic!("expected an invalid-argument error, got {other:?}"),
    }
    let t = Tensor::full([3], 5, (Kind::Int8, Device::Cuda(0)));
    comm.all_reduce(&t, ReduceOp::Max)
        .expect("all_reduce after a rejected call");
    comm.barrier().expect("barrier");
    assert_eq!(
        Vec::<i8>::try_from(&t.to_device(Device::Cpu)).unwrap(),
        [5, 5, 5]
    );
}

#[test]
fn availability_probe_never_panics_and_is_false_without_cuda() {
    let available = NcclComm::available();
    // The probe is cached; a second call agrees.
    assert_eq!(NcclComm::available(), available);
    if !tch::Cuda::is_available() {
        assert!(!available);
    }
}

#[test]
fn without_nccl_forming_a_communicator_is_an_error_not_a_crash() {
    if NcclComm::available() {
        println!("skipped: NCCL is available here (the conformance test covers this machine)");
        return;
    }
    match NcclComm::from_tcp(&TcpRing::single(0), 0) {
        Err(CollectiveError::Nccl(msg)) => {
            println!("as expected: {msg}");
            assert!(!msg.is_empty());
        }
        Err(other) => panic!("expected an NCCL error, got {other}"),
        // The libraries and a GPU are present but this libtorch was built without CUDA.
        Ok(comm) => println!("formed {comm:?} although libtorch sees no CUDA device"),
    }
}

#[test]
fn the_nccl_of_the_torch_wheel_loads_without_a_gpu() {
    // The torch wheel ships NCCL as libnccl.so.2 only: Kiln finds that name itself (no
    // libnccl.so link), and the NCCL that torch 2.11 ships (2.28) is the one it calls.
    let (path, version) = nccl_library().expect("NCCL loads");
    assert!(
        path.file_name().is_some_and(|n| n == "libnccl.so.2"),
        "loaded {}",
        path.display()
    );
    assert!(path.exists(), "{}", path.display());
    assert!((22800..22900).contains(&version), "NCCL version {version}");
    assert_eq!(nccl_version().expect("NCCL loads"), version);
}

#[test]
fn the_wheel_layout_beside_libtorch_is_found_without_the_loader_search() {
    // Step 3 of the search alone, as on a machine whose loader knows no NCCL: the wheel's
    // NCCL beside the loaded libtorch.
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    let torch = library::torch_lib_dir(&maps).expect("libtorch is mapped into this process");
    let beside: Vec<Candidate> = library::candidates(None, Some(&torch))
        .into_iter()
        .filter(|c| matches!(c, Candidate::BesideTorch(_)))
        .collect();
    let api = library::load(&beside).expect("the wheel's libnccl.so.2 beside libtorch");
    assert!(
        api.path.ends_with("nvidia/nccl/lib/libnccl.so.2"),
        "{:?}",
        api.path
    );
    assert!((22800..22900).contains(&api.version), "{}", api.version);
}

#[test]
fn a_missing_explicit_library_is_a_clear_error() {
    let missing = std::env::temp_dir().join("kiln-no-such-dir/libnccl.so.2");
    let candidates = library::candidates(Some(missing.clone().into()), None);
    let err = library::load(&candidates).expect_err("a missing file cannot load");
    let expected = format!(
        "cannot load the NCCL library (tried KILN_NCCL_LIBRARY={}: no such file): install \
         NCCL 2.28 (the nvidia-nccl-cu13 wheel that torch installs, an NGC container, or the \
         libnccl2 package) or set KILN_NCCL_LIBRARY to the path of libnccl.so.2",
        missing.display()
    );
    assert_eq!(err, expected);
}
