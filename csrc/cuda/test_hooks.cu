// The shared header's Philox and T5 bucket functions run on the device, so GPU tests compare the
// device's bits with the reference (tiny kernels, one element per thread). ops.cpp also builds the
// T5 bucket table of the attention binding with t5_bucket, on the device.
#include "cuda/launchers.h"
#include "pyobjectives/device_math.h"

namespace pyobjectives::cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

__global__ void philox_uniform_kernel(PhiloxKey key, const int64_t* offsets, int64_t n, float* out) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) out[i] = philox_uniform(key, uint64_t(offsets[i]));
}

__global__ void philox_run_kernel(PhiloxKey key, const int64_t* start, int64_t n, float* out) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) out[i] = philox_uniform(key, uint64_t(*start) + uint64_t(i));
}

__global__ void t5_bucket_kernel(const int64_t* rel, int64_t n, bool bidirectional, int64_t num_buckets,
                                 int64_t max_distance, int64_t* out) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) out[i] = pyobjectives::t5_bucket(rel[i], bidirectional, num_buckets, max_distance);
}

}  // namespace

void philox_uniform(uint64_t seed, const int64_t* offsets, int64_t n, float* out, cudaStream_t stream) {
  if (n > 0) philox_uniform_kernel<<<blocks(n), kThreads, 0, stream>>>(philox_key(seed), offsets, n, out);
}

void philox_uniform_run(uint64_t seed, const int64_t* start, int64_t n, float* out, cudaStream_t stream) {
  if (n > 0) philox_run_kernel<<<blocks(n), kThreads, 0, stream>>>(philox_key(seed), start, n, out);
}

void t5_bucket(const int64_t* relative_position, int64_t n, bool bidirectional, int64_t num_buckets,
               int64_t max_distance, int64_t* out, cudaStream_t stream) {
  if (n > 0)
    t5_bucket_kernel<<<blocks(n), kThreads, 0, stream>>>(relative_position, n, bidirectional, num_buckets,
                                                         max_distance, out);
}

}  // namespace pyobjectives::cuda
