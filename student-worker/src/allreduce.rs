//! Averaging tensors across the workers of a run over NCCL, GPU to GPU, instead of through the
//! coordinator (behind the `nccl` feature; the design and the bytes it saves are in
//! `docs/workers.md`).
//!
//! One rank (rank 0) makes the group's id with [`new_id`]; the coordinator hands those 128 bytes
//! to every member of a round together with its rank and the world size, and every member joins
//! with [`Group::join`]. Each round every member then calls [`Group::average`] with the same
//! tensors in the same order (the student's variables, or their gradients in the synchronous
//! mode): NCCL's ring all-reduce moves about 2(N-1)/N times the tensors' bytes per GPU, whatever
//! the number of workers, where the coordinator would move N times them in and N times out.
//!
//! Not wired into the worker's round protocol yet: the coordinator does not hand out ids, so
//! this path compiles in the CUDA build check (`scripts/check-cuda-build.sh`) and waits for a
//! machine with several GPUs to be exercised.

use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Device, Storage, Tensor};

use crate::error::{Error, Result};

/// The bytes of an NCCL group id.
pub const ID_BYTES: usize = 128;

/// This worker's membership of an NCCL group.
pub struct Group {
    comm: Comm,
    device: CudaDevice,
}

fn nccl(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::from(candle_core::Error::Msg(format!("nccl {what}: {e:?}")))
}

/// A fresh group id, made once by rank 0 and handed to the others.
pub fn new_id() -> Result<[u8; ID_BYTES]> {
    let id = Id::new().map_err(|e| nccl("making a group id", e))?;
    // `c_char` is i8 or u8 by platform: the id travels as bytes either way.
    Ok(id.internal().map(|c| c as u8))
}

impl Group {
    /// Joins group `id` as `rank` of `world` on `device` (a CUDA device); blocks until every
    /// rank has joined.
    pub fn join(device: &Device, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::Settings(
                "NCCL averaging needs a CUDA device (--device cuda:N)".into(),
            ));
        };
        if rank >= world {
            return Err(Error::Settings(format!(
                "NCCL rank {rank} is outside a group of {world}"
            )));
        }
        let bytes: [u8; ID_BYTES] = id.try_into().map_err(|_| {
            Error::Settings(format!(
                "an NCCL group id has {ID_BYTES} bytes, not {}",
                id.len()
            ))
        })?;
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, id)
            .map_err(|e| nccl("joining the group", e))?;
        Ok(Self {
            comm,
            device: cuda.clone(),
        })
    }

    /// The group's mean of each of `tensors` (f32, on this group's device), in order.
    pub fn average(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        tensors.iter().map(|t| self.average_one(t)).collect()
    }

    fn average_one(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        let n = t.elem_count();
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            return Err(Error::Settings(
                "NCCL averaging of a tensor that is not on the GPU".into(),
            ));
        };
        let start = layout.start_offset();
        let src = cuda.as_cuda_slice::<f32>()?.slice(start..start + n);
        let mut dst = self
            .comm
            .stream()
            .alloc_zeros::<f32>(n)
            .map_err(|e| nccl("allocating the result", e))?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Avg)
            .map_err(|e| nccl("all-reduce", e))?;
        let out = Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, self.device.clone()));
        Ok(Tensor::from_storage(
            out,
            t.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }
}
