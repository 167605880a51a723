/* The emulator's runtime: block/warp barriers, warp exchange slots and the launch loop. */
#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct lg_dim3 { unsigned x, y, z; };
thread_local lg_dim3 threadIdx, blockIdx;
lg_dim3 blockDim, gridDim;

namespace {
struct Block {
  explicit Block(unsigned n) : sync(n), warps(n / 32), slots(n) {
    for (auto& w : warps) w = std::make_unique<std::barrier<>>(32);
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<unsigned long long> slots;   // one 8-byte exchange slot per thread
};
Block* current = nullptr;
}

extern "C" void lg_emu_syncthreads(void) { current->sync.arrive_and_wait(); }

extern "C" void lg_emu_warp_exchange(const void* mine, void* theirs, int size, int src_lane) {
  unsigned t = threadIdx.x, w = t / 32;
  std::memcpy(&current->slots[t], mine, size);
  current->warps[w]->arrive_and_wait();
  std::memcpy(theirs, &current->slots[w * 32 + src_lane], size);
  current->warps[w]->arrive_and_wait();
}

extern "C" int lg_emu_warp_any(int pred) {
  unsigned t = threadIdx.x, w = t / 32;
  current->slots[t] = pred != 0;
  current->warps[w]->arrive_and_wait();
  int any = 0;
  for (unsigned l = 0; l < 32; l++) any |= (int)current->slots[w * 32 + l];
  current->warps[w]->arrive_and_wait();
  return any;
}

/* fn(params) is the kernel wrapper: it unpacks params exactly as cuLaunchKernel would. */
extern "C" void lg_emu_launch(void (*fn)(void**), unsigned grid, unsigned block, void** params) {
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  for (unsigned b = 0; b < grid; b++) {
    Block blk(block);
    current = &blk;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; t++)
      threads.emplace_back([=] { threadIdx = {t, 0, 0}; blockIdx = {b, 0, 0}; fn(params); });
    for (auto& th : threads) th.join();
    current = nullptr;
  }
}
