/* A tiny CUDA emulator for lossgraph's kernels on the host (tests only).

   Blocks run one after another; the threads of a block are real threads, so __syncthreads,
   warp shuffles and __any_sync have their CUDA meaning (they synchronize and exchange through
   barriers in cuda_emu.cpp). __shared__ becomes a function-static variable: one block at a
   time owns it. __CUDA_ARCH__ stays undefined, so the prelude's portable #else branches (the
   bit-level half/bfloat16 conversions) are what runs here. */
#pragma once
#include <math.h>
#include <string.h>

struct lg_dim3 { unsigned x, y, z; };
extern thread_local lg_dim3 threadIdx, blockIdx;
extern lg_dim3 blockDim, gridDim;

extern "C" void lg_emu_syncthreads(void);
extern "C" void lg_emu_warp_exchange(const void* mine, void* theirs, int size, int src_lane);
extern "C" int lg_emu_warp_any(int pred);

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __restrict__ __restrict
#define __shared__ static

inline void __syncthreads() { lg_emu_syncthreads(); }
template <class V> inline V __shfl_xor_sync(unsigned, V v, int mask) {
  V r; lg_emu_warp_exchange(&v, &r, (int)sizeof(V), (int)((threadIdx.x & 31) ^ mask)); return r;
}
template <class V> inline V __shfl_down_sync(unsigned, V v, int delta) {
  int src = (int)(threadIdx.x & 31) + delta;
  V r; lg_emu_warp_exchange(&v, &r, (int)sizeof(V), src < 32 ? src : (int)(threadIdx.x & 31)); return r;
}
inline int __any_sync(unsigned, int pred) { return lg_emu_warp_any(pred); }
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline double __hiloint2double(int hi, int lo) {
  unsigned long long b = ((unsigned long long)(unsigned)hi << 32) | (unsigned)lo;
  double d; memcpy(&d, &b, 8); return d;
}
inline int __double2loint(double d) { unsigned long long b; memcpy(&b, &d, 8); return (int)(unsigned)b; }
inline int __double2hiint(double d) { unsigned long long b; memcpy(&b, &d, 8); return (int)(unsigned)(b >> 32); }
