// The few libtorch C++ entry points Kiln needs that tch does not bind: autocast per device type
// with an explicit dtype, freeing and refilling a storage under its views (fully sharded
// parameters), and the build description of the libtorch loaded at run time.
//
// Every function is `extern "C"`, takes and returns plain integers or a heap string, and
// catches every C++ exception: nothing C++ crosses into Rust. Device types and scalar types
// are c10's enum values (CPU = 0, CUDA = 1; Half = 5, Float = 6, BFloat16 = 15).
#include <ATen/Version.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#endif

#include <cstdlib>
#include <cstring>
#include <string>

extern "C" {

// 1 when autocast is on for `device_type` on this thread, 0 when off, -1 on an error.
int kiln_autocast_is_enabled(int device_type) {
  try {
    return at::autocast::is_autocast_enabled(static_cast<c10::DeviceType>(device_type)) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// 0 on success, -1 on an error (an unknown device type).
int kiln_autocast_set_enabled(int device_type, int enabled) {
  try {
    at::autocast::set_autocast_enabled(static_cast<c10::DeviceType>(device_type), enabled != 0);
    return 0;
  } catch (...) {
    return -1;
  }
}

// The scalar type autocast casts to on `device_type`, or -1 on an error.
int kiln_autocast_get_dtype(int device_type) {
  try {
    return static_cast<int>(
        at::autocast::get_autocast_dtype(static_cast<c10::DeviceType>(device_type)));
  } catch (...) {
    return -1;
  }
}

// 0 on success, -1 on an error (libtorch refuses a dtype the device type does not support).
int kiln_autocast_set_dtype(int device_type, int scalar_type) {
  try {
    at::autocast::set_autocast_dtype(static_cast<c10::DeviceType>(device_type),
                                     static_cast<c10::ScalarType>(scalar_type));
    return 0;
  } catch (...) {
    return -1;
  }
}

// 1 when autocast caches its casts of leaf tensors on this thread, 0 when not, -1 on an error.
int kiln_autocast_cache_enabled() {
  try {
    return at::autocast::is_autocast_cache_enabled() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// 0 on success, -1 on an error. The setting is this thread's.
int kiln_autocast_set_cache_enabled(int enabled) {
  try {
    at::autocast::set_autocast_cache_enabled(enabled != 0);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Gives the storage of `*t` `nbytes` of fresh, uninitialized memory from the allocator that
// made it, in place: with 0, its memory is freed. Every view of the storage (autograd's saved
// tensors among them) keeps its sizes and offset and sees the new memory. `t` is a tch tensor
// handle (a `torch::Tensor*`). 0 on success, -1 on an error.
int kiln_storage_reallocate(const at::Tensor* t, size_t nbytes) {
  try {
    c10::StorageImpl* storage = t->storage().unsafeGetStorageImpl();
    c10::Allocator* allocator = storage->allocator();
    if (allocator == nullptr) {
      return -1;
    }
    storage->set_data_ptr_noswap(allocator->allocate(nbytes));
    storage->set_nbytes(nbytes);
    return 0;
  } catch (...) {
    return -1;
  }
}

// A new handle on `*t`'s data with a version counter of its own (`variable_data`): writing
// through it does not mark the tensors autograd saved from `*t`'s views as modified. Null on
// an error.
at::Tensor* kiln_untracked(const at::Tensor* t) {
  try {
    return new at::Tensor(t->variable_data());
  } catch (...) {
    return nullptr;
  }
}

// `at::show_config()`: how the loaded libtorch was built (its version, CUDA and cuDNN
// versions, CPU capability). A malloc'd string for `kiln_free`, or null on an error.
char* kiln_torch_config() {
  try {
    std::string s = at::show_config();
    char* out = static_cast<char*>(std::malloc(s.size() + 1));
    if (out != nullptr) {
      std::memcpy(out, s.c_str(), s.size() + 1);
    }
    return out;
  } catch (...) {
    return nullptr;
  }
}

void kiln_free(char* p) { std::free(p); }

// The libtorch version of the headers this file was compiled against, as
// major * 10000 + minor * 100 + patch; 0 when the headers do not say.
int kiln_torch_header_version() {
#ifdef TORCH_VERSION_MAJOR
  return TORCH_VERSION_MAJOR * 10000 + TORCH_VERSION_MINOR * 100 + TORCH_VERSION_PATCH;
#else
  return 0;
#endif
}

}  // extern "C"
