//! NCCL backend (in progress).
