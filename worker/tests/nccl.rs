//! The NCCL backend: the conformance suite on a CUDA device when one is present (NCCL runs one
//! rank per GPU, so a one-GPU machine checks world size 1; multi-rank behaviour is checked on
//! the TCP backend, which passes the same suite), and the availability probe everywhere.

use kiln_worker::collective::nccl::{nccl_version, NcclComm};
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
    // scripts/setup.sh links libnccl.so in the wheel, the build puts it on the rpath: the
    // NCCL that torch 2.11 ships (2.28) is the one Kiln calls.
    let version = nccl_version().expect("NCCL loads");
    assert!((22800..22900).contains(&version), "NCCL version {version}");
}
