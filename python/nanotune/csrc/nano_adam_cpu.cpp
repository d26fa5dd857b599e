// NanoAdam's CPU kernels: the sparse step, the bottom-k selection and the moment
// remap, each one pass over the memory it needs (Note [CPU kernels] in optim.py).
//
// Built on first use by nanotune.kernels (torch.utils.cpp_extension.load) and
// cached; optim.py falls back to its torch-op paths when no compiler is there.
// Every result equals the torch-op reference bit for bit: the same fp32
// operations in the same order, fused where torch's own kernels fuse them
// (lerp's and addcmul's multiply-add), and the square root taken by torch itself
// (at::sqrt_out on a block: torch's CPU sqrt comes from MKL/SLEEF and is not always
// the correctly rounded std::sqrt). tests/python/test_optim_kernels.py checks it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Entries of one mask handled together: small enough that the three fp32
// working arrays stay in L1/L2, large enough that at::sqrt_out's call is amortised.
constexpr int64_t kBlock = 2048;
// How many mask entries ahead the step prefetches the gradient's and the weights'
// cache lines (the entries are scattered, so the hardware prefetchers miss them).
constexpr int64_t kAhead = 24;

// Where entry j of a stored mask lives in the flat tensor: int16 offsets inside
// chunks (full chunks of k_full entries each, then the tail), int32 flat
// indices, or none (a dense tensor: entry j is j).
struct Layout {
  const int16_t* off16 = nullptr;
  const int32_t* idx32 = nullptr;
  int64_t k_full = 1;     // entries per full chunk
  int64_t in_full = 0;    // entries in all full chunks (rows * k_full)
  int64_t chunk = 1;      // chunk size
  int64_t tail_start = 0; // flat index where the tail chunk starts

  inline int64_t flat(int64_t j) const {
    if (off16) return j < in_full ? (j / k_full) * chunk + off16[j] : tail_start + off16[j];
    if (idx32) return idx32[j];
    return j;
  }
};

// Bias-correction factors of one tensor: one (step size, sqrt(1 - beta2^t)) pair,
// or per entry from fp32 tables indexed by min(age + since, cap).
struct Counts {
  float step_size = 0.f, bc2_sqrt = 1.f;
  const int16_t* age16 = nullptr;
  const int32_t* age32 = nullptr;
  int64_t since = 0, cap = 0;
  const float* step_table = nullptr;
  const float* bc2_table = nullptr;

  inline bool per_entry() const { return age16 || age32; }
  inline int64_t age(int64_t j) const {
    int64_t a = (age16 ? int64_t(age16[j]) : int64_t(age32[j])) + since;
    return a < cap ? a : cap;
  }
};

struct Hyper {
  float one_minus_beta1, beta2, one_minus_beta2, eps, decay;
  bool small_weight, has_decay;
};

// torch's lerp (ATen/native/Lerp.h and its vectorised form): self + w * (end - self)
// for |w| < 0.5 as one fused multiply-add, else end - (end - self) * (1 - w).
inline float lerp(float self, float end, float w, bool small) {
  float diff = end - self;
  return small ? std::fma(w, diff, self) : std::fma(-diff, 1.0f - w, end);
}

template <typename P, typename M>
void step_tensor(P* p, const P* g, bool gathered, M* m, M* v, const Layout& L, int64_t n,
                 const Counts& c, const Hyper& h) {
  at::parallel_for(0, n, kBlock, [&](int64_t lo, int64_t hi) {
    float m32[kBlock], v32[kBlock], root[kBlock];
    for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
      const int64_t len = std::min(kBlock, hi - b0);
      for (int64_t i = 0; i < len; ++i) {
        const int64_t j = b0 + i;
        if (j + kAhead < hi) {  // the mask's entries are scattered: ask for their lines early
          const int64_t ahead = L.flat(j + kAhead);
          if (!gathered) __builtin_prefetch(g + ahead);
          __builtin_prefetch(p + ahead, 1);
        }
        const float gj = static_cast<float>(g[gathered ? j : L.flat(j)]);
        m32[i] = lerp(static_cast<float>(m[j]), gj, h.one_minus_beta1, h.small_weight);
        // v.mul_(beta2).addcmul_(g, g, value=1 - beta2): (value * g) * g + v, fused.
        v32[i] = std::fma(h.one_minus_beta2 * gj, gj, static_cast<float>(v[j]) * h.beta2);
      }
      at::Tensor vin = at::from_blob(v32, {len}, at::kFloat);
      at::Tensor vout = at::from_blob(root, {len}, at::kFloat);
      at::sqrt_out(vout, vin);
      for (int64_t i = 0; i < len; ++i) {
        const int64_t j = b0 + i;
        const int64_t f = L.flat(j);
        float theta = static_cast<float>(p[f]);
        if (h.has_decay) theta = theta * h.decay;
        if (c.per_entry()) {  // theta.addcdiv_(m * step_size, denom, value=-1)
          const int64_t a = c.age(j);
          const float denom = root[i] / c.bc2_table[a] + h.eps;
          theta = theta + (-(m32[i] * c.step_table[a])) / denom;
        } else {  // theta.addcdiv_(m, denom, value=-step_size)
          const float denom = root[i] / c.bc2_sqrt + h.eps;
          theta = theta + (-c.step_size * m32[i]) / denom;
        }
        p[f] = static_cast<P>(theta);
        m[j] = static_cast<M>(m32[i]);
        v[j] = static_cast<M>(v32[i]);
      }
    }
  });
}

template <typename P>
void step_dispatch_m(const at::Tensor& p, const at::Tensor& g, bool gathered, const at::Tensor& m,
                     const at::Tensor& v, const Layout& L, const Counts& c, const Hyper& h) {
  const int64_t n = m.numel();
  switch (m.scalar_type()) {
    case at::kFloat:
      return step_tensor<P, float>(p.data_ptr<P>(), g.data_ptr<P>(), gathered, m.data_ptr<float>(),
                                   v.data_ptr<float>(), L, n, c, h);
    case at::kBFloat16:
      return step_tensor<P, at::BFloat16>(p.data_ptr<P>(), g.data_ptr<P>(), gathered, m.data_ptr<at::BFloat16>(),
                                          v.data_ptr<at::BFloat16>(), L, n, c, h);
    case at::kHalf:
      return step_tensor<P, at::Half>(p.data_ptr<P>(), g.data_ptr<P>(), gathered, m.data_ptr<at::Half>(),
                                      v.data_ptr<at::Half>(), L, n, c, h);
    default:
      TORCH_CHECK(false, "nano_adam_step: moments of dtype ", m.scalar_type(), " are not supported");
  }
}

// One NanoAdam step over a list of tensors (see nano_adam in optim.py for the
// arguments' meaning). layouts: 3 ints per tensor (k_full, rows_full, chunk);
// ages/since/tables: the per-entry counts, or step_sizes/bc2s for one count.
void step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
          std::vector<at::Tensor> exp_avg_sqs, std::vector<c10::optional<at::Tensor>> idxs,
          std::vector<int64_t> layouts, std::vector<double> step_sizes, std::vector<double> bc2s,
          std::vector<c10::optional<at::Tensor>> ages, std::vector<int64_t> since,
          c10::optional<at::Tensor> step_table, c10::optional<at::Tensor> bc2_table, int64_t cap,
          double beta1, double beta2, double eps, double decay) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count &&
                  idxs.size() == count && layouts.size() == 3 * count && step_sizes.size() == count &&
                  bc2s.size() == count && ages.size() == count && since.size() == count,
              "nano_adam_step: argument lists differ in length");
  Hyper h;
  // Python floats as torch takes them: the scalar, computed in double, cast to float.
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.small_weight = std::abs(h.one_minus_beta1) < 0.5f;
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.decay = static_cast<float>(decay);
  h.has_decay = decay != 1.0;
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor& m = exp_avgs[i];
    const at::Tensor& v = exp_avg_sqs[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && g.is_contiguous() && m.is_contiguous() &&
                    v.is_contiguous(), "nano_adam_step: tensor ", i, " is not a contiguous CPU tensor");
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), "nano_adam_step: tensor ", i, " has a gradient of dtype ",
                g.scalar_type(), " for a parameter of dtype ", p.scalar_type());
    TORCH_CHECK(m.scalar_type() == v.scalar_type() && m.numel() == v.numel(), "nano_adam_step: moments differ");
    Layout L;
    if (idxs[i].has_value()) {
      const at::Tensor& idx = *idxs[i];
      TORCH_CHECK(idx.numel() == m.numel(), "nano_adam_step: tensor ", i, " has ", idx.numel(),
                  " mask entries for ", m.numel(), " moments");
      if (idx.scalar_type() == at::kShort) {
        L.off16 = idx.data_ptr<int16_t>();
        L.k_full = std::max<int64_t>(1, layouts[3 * i]);
        L.in_full = layouts[3 * i] * layouts[3 * i + 1];
        L.chunk = layouts[3 * i + 2];
        L.tail_start = layouts[3 * i + 1] * L.chunk;
      } else {
        TORCH_CHECK(idx.scalar_type() == at::kInt, "nano_adam_step: mask of dtype ", idx.scalar_type());
        L.idx32 = idx.data_ptr<int32_t>();
      }
    } else {
      TORCH_CHECK(m.numel() == p.numel(), "nano_adam_step: dense tensor ", i, " has moments of another size");
    }
    const bool gathered = (L.off16 || L.idx32) && g.numel() == m.numel();
    TORCH_CHECK(gathered || g.numel() == p.numel(), "nano_adam_step: tensor ", i, " has a gradient of ",
                g.numel(), " entries");
    Counts c;
    if (ages[i].has_value()) {
      const at::Tensor& age = *ages[i];
      TORCH_CHECK(age.numel() == m.numel() && step_table.has_value() && bc2_table.has_value(),
                  "nano_adam_step: per-entry counts need ages of the mask's length and both tables");
      if (age.scalar_type() == at::kShort) c.age16 = age.data_ptr<int16_t>();
      else c.age32 = age.data_ptr<int32_t>();
      c.since = since[i];
      c.cap = cap;
      c.step_table = step_table->data_ptr<float>();
      c.bc2_table = bc2_table->data_ptr<float>();
    } else {
      c.step_size = static_cast<float>(step_sizes[i]);
      c.bc2_sqrt = static_cast<float>(bc2s[i]);
    }
    switch (p.scalar_type()) {
      case at::kFloat: step_dispatch_m<float>(p, g, gathered, m, v, L, c, h); break;
      case at::kBFloat16: step_dispatch_m<at::BFloat16>(p, g, gathered, m, v, L, c, h); break;
      case at::kHalf: step_dispatch_m<at::Half>(p, g, gathered, m, v, L, c, h); break;
      default: TORCH_CHECK(false, "nano_adam_step: parameters of dtype ", p.scalar_type(), " are not supported");
    }
  }
}

// ----------------------------------------------------------------------------
// Selection: per chunk, the k entries of smallest key, ties to the lower index
// (select_mask's rule). Keys are |x| as fp32 bit patterns (monotone in |x| for
// non-negative floats); for the largest entries the keys are complemented.

template <typename T>
inline uint32_t magnitude_key(T x) {
  float f = static_cast<float>(x);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits & 0x7fffffffu;
}

// The k smallest of keys[0..w) (key then index), written ascending by index to out.
// A sample of the row bounds the k-th key from both sides; one pass then writes the
// entries below the lower bound straight out and collects those between the bounds;
// the k-th among those few decides the rest. A bad sample (rare) falls back to
// nth_element on the whole row: the result is the same either way.
void select_row(const uint32_t* keys, int64_t w, int64_t k, int32_t base, int32_t* out,
                std::vector<int32_t>& below, std::vector<int32_t>& between, std::vector<uint32_t>& scratch) {
  if (k >= w) {
    for (int64_t i = 0; i < w; ++i) out[i] = base + int32_t(i);
    return;
  }
  // Bounds from a strided sample: the sample's order statistics around rank k * s / w,
  // 4 standard deviations of that rank either side.
  const int64_t s = std::min<int64_t>(w, 1024);
  const int64_t stride = w / s;
  scratch.resize(s);
  for (int64_t i = 0; i < s; ++i) scratch[i] = keys[i * stride];
  const double q = double(k) / double(w);
  const double rank = q * double(s);
  const double spread = 4.0 * std::sqrt(std::max(1.0, rank * (1.0 - q))) + 2.0;
  const int64_t lo_rank = int64_t(std::floor(rank - spread));
  const int64_t hi_rank = int64_t(std::ceil(rank + spread));
  uint64_t lo = 0, hi = uint64_t(1) << 32;  // keys in [lo, hi) are candidates
  if (lo_rank > 0) {
    std::nth_element(scratch.begin(), scratch.begin() + lo_rank, scratch.end());
    lo = scratch[lo_rank];
  }
  if (hi_rank < s) {
    std::nth_element(scratch.begin(), scratch.begin() + hi_rank, scratch.end());
    hi = scratch[hi_rank];
  }
  below.resize(w + 1);
  between.resize(w + 1);
  int64_t nb = 0, nc = 0;
  for (int64_t i = 0; i < w; ++i) {  // branch-free: both stores always, counts advance
    const uint64_t key = keys[i];
    below[nb] = int32_t(i);
    between[nc] = int32_t(i);
    nb += key < lo;
    nc += (key >= lo) & (key < hi);
  }
  uint32_t kth;
  int64_t need;  // entries equal to kth that are taken, lowest index first
  if (nb <= k - 1 && k - 1 < nb + nc) {
    scratch.resize(nc);
    for (int64_t i = 0; i < nc; ++i) scratch[i] = keys[between[i]];
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1 - nb), scratch.end());
    kth = scratch[k - 1 - nb];
  } else {
    scratch.assign(keys, keys + w);
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end());
    kth = scratch[k - 1];
    // Recollect around the exact k-th key.
    nb = nc = 0;
    for (int64_t i = 0; i < w; ++i) {
      const uint32_t key = keys[i];
      below[nb] = int32_t(i);
      between[nc] = int32_t(i);
      nb += key < kth;
      nc += key == kth;
    }
  }
  int64_t less = nb;
  for (int64_t i = 0; i < nc; ++i) less += keys[between[i]] < kth;
  need = k - less;
  // Merge the entries below lo with the chosen candidates, both ascending.
  int64_t a = 0, n = 0;
  for (int64_t i = 0; i < nc; ++i) {
    const int32_t idx = between[i];
    const uint32_t key = keys[idx];
    bool take = key < kth;
    if (!take && key == kth && need > 0) {
      take = true;
      --need;
    }
    if (!take) continue;
    while (a < nb && below[a] < idx) out[n++] = base + below[a++];
    out[n++] = base + idx;
  }
  while (a < nb) out[n++] = base + below[a++];
  TORCH_CHECK(n == k, "select_row: selected ", n, " of ", k);
}

template <typename T>
void select_runs(const T* src, const std::vector<int64_t>& runs, bool largest, int32_t* out) {
  // runs: (start, width, rows, k) per run of equal chunks.
  struct Row { int64_t start, width, k, out_at; };
  std::vector<Row> rows;
  int64_t at = 0;
  for (size_t r = 0; r + 3 < runs.size(); r += 4) {
    for (int64_t i = 0; i < runs[r + 2]; ++i) {
      rows.push_back({runs[r] + i * runs[r + 1], runs[r + 1], runs[r + 3], at});
      at += runs[r + 3];
    }
  }
  at::parallel_for(0, int64_t(rows.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> keys, scratch;
    std::vector<int32_t> below, between;
    for (int64_t r = lo; r < hi; ++r) {
      const Row& row = rows[r];
      keys.resize(row.width);
      const T* x = src + row.start;
      if (largest) {
        for (int64_t i = 0; i < row.width; ++i) keys[i] = ~magnitude_key(x[i]);
      } else {
        for (int64_t i = 0; i < row.width; ++i) keys[i] = magnitude_key(x[i]);
      }
      select_row(keys.data(), row.width, row.k, int32_t(row.start), out + row.out_at, below, between, scratch);
    }
  });
}

at::Tensor select_chunks(const at::Tensor& source, std::vector<int64_t> runs, bool largest) {
  TORCH_CHECK(source.device().is_cpu() && source.is_contiguous(), "select: source must be a contiguous CPU tensor");
  TORCH_CHECK(runs.size() % 4 == 0, "select: runs come in fours (start, width, rows, k)");
  int64_t total = 0;
  for (size_t r = 0; r < runs.size(); r += 4) {
    TORCH_CHECK(runs[r + 3] >= 1 && runs[r + 3] <= runs[r + 1], "select: k out of range");
    TORCH_CHECK(runs[r] + runs[r + 1] * runs[r + 2] <= source.numel(), "select: run beyond the tensor");
    total += runs[r + 2] * runs[r + 3];
  }
  at::Tensor out = at::empty({total}, source.options().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  switch (source.scalar_type()) {
    case at::kFloat: select_runs(source.data_ptr<float>(), runs, largest, o); break;
    case at::kBFloat16: select_runs(source.data_ptr<at::BFloat16>(), runs, largest, o); break;
    case at::kHalf: select_runs(source.data_ptr<at::Half>(), runs, largest, o); break;
    default: TORCH_CHECK(false, "select: dtype ", source.scalar_type(), " is not supported");
  }
  return out;
}

// ----------------------------------------------------------------------------
// Remap: values at new_idx, carried from old_idx where an index stays, zero where
// it is new (optim._remap), for several value arrays at once. Both index lists are
// ascending; each block of new indices finds its start in old_idx by binary search
// and then walks both lists together.

template <typename E>
void remap_values(const int32_t* old_idx, int64_t n_old, const int32_t* new_idx, int64_t n_new,
                  const std::vector<const E*>& src, const std::vector<E*>& dst) {
  at::parallel_for(0, n_new, 16384, [&](int64_t lo, int64_t hi) {
    int64_t a = std::lower_bound(old_idx, old_idx + n_old, new_idx[lo]) - old_idx;
    for (int64_t j = lo; j < hi; ++j) {
      const int32_t want = new_idx[j];
      while (a < n_old && old_idx[a] < want) ++a;
      const bool stays = a < n_old && old_idx[a] == want;
      for (size_t t = 0; t < src.size(); ++t) dst[t][j] = stays ? src[t][a] : E(0);
    }
  });
}

std::vector<at::Tensor> remap_moments(const at::Tensor& old_idx, const at::Tensor& new_idx, std::vector<at::Tensor> values) {
  TORCH_CHECK(old_idx.scalar_type() == at::kInt && new_idx.scalar_type() == at::kInt && old_idx.is_contiguous() &&
                  new_idx.is_contiguous(), "remap: indices must be contiguous int32");
  std::vector<at::Tensor> out;
  for (auto& v : values) {
    TORCH_CHECK(v.is_contiguous() && v.numel() == old_idx.numel(), "remap: a value array does not match old_idx");
    out.push_back(at::empty({new_idx.numel()}, v.options()));
  }
  // Raw bit copies grouped by element size: fp32/int32 as 4 bytes, bf16/fp16/int16 as 2.
  for (int64_t size : {4, 2}) {
    std::vector<const uint32_t*> s4; std::vector<uint32_t*> d4;
    std::vector<const uint16_t*> s2; std::vector<uint16_t*> d2;
    for (size_t t = 0; t < values.size(); ++t) {
      const int64_t es = values[t].element_size();
      TORCH_CHECK(es == 4 || es == 2, "remap: element size ", es);
      if (es != size) continue;
      if (size == 4) { s4.push_back(static_cast<const uint32_t*>(values[t].data_ptr())); d4.push_back(static_cast<uint32_t*>(out[t].data_ptr())); }
      else { s2.push_back(static_cast<const uint16_t*>(values[t].data_ptr())); d2.push_back(static_cast<uint16_t*>(out[t].data_ptr())); }
    }
    if (size == 4 && !s4.empty())
      remap_values<uint32_t>(old_idx.data_ptr<int32_t>(), old_idx.numel(), new_idx.data_ptr<int32_t>(), new_idx.numel(), s4, d4);
    if (size == 2 && !s2.empty())
      remap_values<uint16_t>(old_idx.data_ptr<int32_t>(), old_idx.numel(), new_idx.data_ptr<int32_t>(), new_idx.numel(), s2, d2);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step", &step, "One NanoAdam step over a list of CPU tensors");
  m.def("select", &select_chunks, "Bottom-k (or top-k) of |x| per chunk; ties to the lower index");
  m.def("remap", &remap_moments, "Values at new indices, carried where an index stays, zero where new");
}
