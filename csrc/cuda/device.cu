// Device queries and the current-device guard.
#include "common.cuh"

namespace pyengine::cuda {

int device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess) return count;
  cudaGetLastError();  // clear it, so the next runtime call does not report it again
  switch (err) {
    // No GPU, no libcuda (or only its stub), or a driver older than this runtime: no devices.
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorStubLibrary:
    case cudaErrorInitializationError:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
      return 0;
    default:
      throw std::runtime_error(std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err));
  }
}

DeviceGuard::DeviceGuard(int device) {
  throw_on_error(cudaGetDevice(&previous_), "cudaGetDevice");
  if (previous_ != device) throw_on_error(cudaSetDevice(device), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

}  // namespace pyengine::cuda
