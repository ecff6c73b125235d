// One concept head as both head kernels (wide.h, narrow.h) see it: a view of its parameters and where its
// gradients go. The kernels compute gradients only; the grid (grid.h) applies Adam.
#pragma once

#include "common.h"

namespace iis {

struct Head {
  const float *W, *b, *gam, *bet;  // parameters: W [M, K], b [K], gamma/beta [M]
  int M, K, r;                     // r = k + 1: entries <= the r-th smallest |z| are dropped
  bool dense;                      // dense products over all M concepts (many kept) or sparse ones over the kept
  int row_block;                   // rows per block of scratch
};

struct Grads {
  float *dW, *db, *dg, *dbe;      // [M, K], [K], [M], [M]; overwritten (zeroed by the kernel)
  float* dbg_logits = nullptr;    // optional [nb, K]: logits (bias included) of every row
  int64_t* dbg_kept = nullptr;    // optional [nb]: kept entries of every row
};

}  // namespace iis
