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
#include <climits>
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

// One tensor of a step.
struct StepJob {
  void* p = nullptr;        // the weights (P)
  const void* g = nullptr;  // the gradient (P): gathered at the mask, or dense
  void* m = nullptr;        // the moments (M), one per mask entry
  void* v = nullptr;
  bool gathered = false;
  at::ScalarType p_type = at::kFloat, m_type = at::kFloat;
  Layout layout;
  Counts counts;
};

// Entries [lo, hi) of one tensor's mask, in one pass: gather, moments, update, scatter.
template <typename P, typename M>
void step_block(const StepJob& job, int64_t lo, int64_t hi, const Hyper& h) {
  P* __restrict p = static_cast<P*>(job.p);
  const P* __restrict g = static_cast<const P*>(job.g);
  M* __restrict m = static_cast<M*>(job.m);
  M* __restrict v = static_cast<M*>(job.v);
  const Layout& L = job.layout;
  const Counts& c = job.counts;
  int64_t flat[kBlock];
  float m32[kBlock], v32[kBlock], root[kBlock];
  const int64_t len = hi - lo;
  for (int64_t i = 0; i < len; ++i) flat[i] = L.flat(lo + i);
  for (int64_t i = 0; i < len; ++i) {
    if (i + kAhead < len) {  // the mask's entries are scattered: ask for their lines early
      if (!job.gathered) __builtin_prefetch(g + flat[i + kAhead]);
      __builtin_prefetch(p + flat[i + kAhead], 1);
    }
    const int64_t j = lo + i;
    const float gj = static_cast<float>(g[job.gathered ? j : flat[i]]);
    m32[i] = lerp(static_cast<float>(m[j]), gj, h.one_minus_beta1, h.small_weight);
    // v.mul_(beta2).addcmul_(g, g, value=1 - beta2): (value * g) * g + v, fused.
    v32[i] = std::fma(h.one_minus_beta2 * gj, gj, static_cast<float>(v[j]) * h.beta2);
  }
  at::Tensor vin = at::from_blob(v32, {len}, at::kFloat);
  at::Tensor vout = at::from_blob(root, {len}, at::kFloat);
  at::sqrt_out(vout, vin);  // torch's own square root (see the top of this file)
  for (int64_t i = 0; i < len; ++i) {
    const int64_t j = lo + i;
    float theta = static_cast<float>(p[flat[i]]);
    if (h.has_decay) theta = theta * h.decay;
    if (c.per_entry()) {  // theta.addcdiv_(m * step_size, denom, value=-1)
      const int64_t a = c.age(j);
      const float denom = root[i] / c.bc2_table[a] + h.eps;
      theta = theta + (-(m32[i] * c.step_table[a])) / denom;
    } else {  // theta.addcdiv_(m, denom, value=-step_size)
      const float denom = root[i] / c.bc2_sqrt + h.eps;
      theta = theta + (-c.step_size * m32[i]) / denom;
    }
    p[flat[i]] = static_cast<P>(theta);
    m[j] = static_cast<M>(m32[i]);
    v[j] = static_cast<M>(v32[i]);
  }
}

template <typename P>
void step_block_m(const StepJob& job, int64_t lo, int64_t hi, const Hyper& h) {
  switch (job.m_type) {
    case at::kFloat: return step_block<P, float>(job, lo, hi, h);
    case at::kBFloat16: return step_block<P, at::BFloat16>(job, lo, hi, h);
    default: return step_block<P, at::Half>(job, lo, hi, h);
  }
}

void step_block_any(const StepJob& job, int64_t lo, int64_t hi, const Hyper& h) {
  switch (job.p_type) {
    case at::kFloat: return step_block_m<float>(job, lo, hi, h);
    case at::kBFloat16: return step_block_m<at::BFloat16>(job, lo, hi, h);
    default: return step_block_m<at::Half>(job, lo, hi, h);
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
  std::vector<StepJob> jobs(count);
  struct Block { int64_t job, lo, hi; };
  std::vector<Block> blocks;
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
    StepJob& job = jobs[i];
    Layout& L = job.layout;
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
    Counts& c = job.counts;
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
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf,
                "nano_adam_step: parameters of dtype ", p.scalar_type(), " are not supported");
    TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kBFloat16 || m.scalar_type() == at::kHalf,
                "nano_adam_step: moments of dtype ", m.scalar_type(), " are not supported");
    job.p = p.data_ptr();
    job.g = g.data_ptr();
    job.m = m.data_ptr();
    job.v = v.data_ptr();
    job.gathered = gathered;
    job.p_type = p.scalar_type();
    job.m_type = m.scalar_type();
    for (int64_t lo = 0; lo < m.numel(); lo += kBlock) blocks.push_back({int64_t(i), lo, std::min(m.numel(), lo + kBlock)});
  }
  // Every block of every tensor in one parallel loop (one fork for the whole step).
  at::parallel_for(0, int64_t(blocks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) step_block_any(jobs[blocks[b].job], blocks[b].lo, blocks[b].hi, h);
  });
}

// ----------------------------------------------------------------------------
// The refresh: per chunk, the k entries of smallest key, ties to the lower index
// (select_mask's rule), and the moments of the entries that stay (optim._remap).
// Keys are |x| as fp32 bit patterns, monotone in |x| for non-negative floats; for
// the largest entries they are complemented, so the smallest key still wins.
//
// Per chunk, without sorting: a strided sample of 512 keys bounds the k-th key
// from both sides (3 standard deviations of its rank); one pass counts the keys
// below the lower bound and collects the few between the bounds; a histogram of
// those finds the k-th exactly; a last pass writes the offsets below it (and the
// tied ones, lowest index first). A sample that misses (rare) widens the bounds to
// every key, which only costs time. With AVX-512 the passes run 16 keys at a time.

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

template <typename T>
inline uint32_t magnitude_key(T x) {
  float f = static_cast<float>(x);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits & 0x7fffffffu;
}

// A chunk's keys: (bits & mask) ^ flip. fp32 weights are read as they lie (mask drops
// the sign, flip complements for the largest entries); other dtypes are converted to
// keys first (mask and flip then leave them as they are).
struct Keys {
  const uint32_t* bits;
  uint32_t mask, flip;
  inline uint32_t operator[](int64_t i) const { return (bits[i] & mask) ^ flip; }
};

// Thread-local working memory, sized for one chunk.
struct Scratch {
  std::vector<uint32_t> keys, sample, bin_keys;
  std::vector<int32_t> cand, sel;
  std::vector<uint32_t> hist;
  std::vector<char> carried;  // one chunk's old values, when they are replaced in place
  std::vector<uint64_t> bits;  // one chunk's old offsets, as a bitmap
  std::vector<int32_t> below;  // and the set bits before each of its words
  // The window the previous chunk suggests for the next one of the same (width, k):
  // chunks of one tensor are alike, so it usually holds the k-th key and no sample is drawn.
  int64_t window_w = -1, window_k = -1;
  uint32_t window_lo = 0, window_hi = 0;
  bool window_hi_all = true;
  // The next chunk's bytes, fetched into L2 while this one is selected.
  const char* next = nullptr;
  int64_t next_bytes = 0;
  void fit(int64_t w) {
    if (int64_t(keys.size()) < w + 16) {
      keys.resize(w + 16);
      cand.resize(w + 16);
      sel.resize(w + 16);
    }
  }
};

// Counts keys < lo and collects the offsets of keys in [lo, hi) (hi_all: no upper bound).
inline int64_t collect(const Keys& keys, int64_t w, uint32_t lo, uint32_t hi, bool hi_all, int32_t* cand,
                       int64_t& nc, const char* next, int64_t next_bytes) {
  int64_t nb = 0, i = 0;
  nc = 0;
#if defined(__AVX512F__)
  const __m512i vlo = _mm512_set1_epi32(int32_t(lo)), vhi = _mm512_set1_epi32(int32_t(hi));
  const __m512i vmask = _mm512_set1_epi32(int32_t(keys.mask)), vflip = _mm512_set1_epi32(int32_t(keys.flip));
  const __m512i step = _mm512_set1_epi32(16);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= w; i += 16, iv = _mm512_add_epi32(iv, step)) {
    if (i * 4 < next_bytes) __builtin_prefetch(next + i * 4, 0, 2);  // one line of the next chunk per 16 keys
    const __m512i kv = _mm512_xor_si512(_mm512_and_si512(_mm512_loadu_si512(keys.bits + i), vmask), vflip);
    const __mmask16 below = _mm512_cmplt_epu32_mask(kv, vlo);
    const __mmask16 under = hi_all ? __mmask16(0xffff) : _mm512_cmplt_epu32_mask(kv, vhi);
    const __mmask16 between = under & __mmask16(~below);
    nb += __builtin_popcount(below);
    _mm512_storeu_si512(cand + nc, _mm512_maskz_compress_epi32(between, iv));
    nc += __builtin_popcount(between);
  }
#endif
  for (; i < w; ++i) {  // branch-free: the store always happens, the count advances
    const uint32_t key = keys[i];
    cand[nc] = int32_t(i);
    nb += key < lo;
    nc += (key >= lo) & (hi_all | (key < hi));
  }
  return nb;
}

// Writes the offsets of keys < kth, then (inclusive) also == kth, ascending; returns the count.
inline int64_t emit(const Keys& keys, int64_t w, uint32_t kth, bool inclusive, int32_t* out) {
  int64_t n = 0, i = 0;
#if defined(__AVX512F__)
  const __m512i vk = _mm512_set1_epi32(int32_t(kth));
  const __m512i vmask = _mm512_set1_epi32(int32_t(keys.mask)), vflip = _mm512_set1_epi32(int32_t(keys.flip));
  const __m512i step = _mm512_set1_epi32(16);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= w; i += 16, iv = _mm512_add_epi32(iv, step)) {
    const __m512i kv = _mm512_xor_si512(_mm512_and_si512(_mm512_loadu_si512(keys.bits + i), vmask), vflip);
    const __mmask16 take = inclusive ? _mm512_cmple_epu32_mask(kv, vk) : _mm512_cmplt_epu32_mask(kv, vk);
    _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi32(take, iv));
    n += __builtin_popcount(take);
  }
#endif
  for (; i < w; ++i) {
    out[n] = int32_t(i);
    n += inclusive ? keys[i] <= kth : keys[i] < kth;
  }
  return n;
}

// The k smallest of keys[0..w) (key, then offset), ascending by offset, into s.sel.
void select_row(const Keys& keys, int64_t w, int64_t k, Scratch& s) {
  int32_t* sel = s.sel.data();
  if (k >= w) {
    for (int64_t i = 0; i < w; ++i) sel[i] = int32_t(i);
    return;
  }
  uint32_t lo = 0, hi = 0;
  bool hi_all = true;
  int64_t nc = 0, nb = -1;
  if (s.window_w == w && s.window_k == k) {  // the previous chunk's window
    lo = s.window_lo, hi = s.window_hi, hi_all = s.window_hi_all;
    nb = collect(keys, w, lo, hi, hi_all, s.cand.data(), nc, s.next, s.next_bytes);
  }
  if (!(nb >= 0 && nb <= k - 1 && k - 1 < nb + nc)) {
    // Bounds from a strided sample: its order statistics 3 standard deviations of the
    // k-th's rank either side.
    const int64_t n_sample = std::min<int64_t>(w, 512);
    const int64_t stride = w / n_sample;
    s.sample.resize(n_sample);
    for (int64_t i = 0; i < n_sample; ++i) s.sample[i] = keys[i * stride];
    const double q = double(k) / double(w), rank = q * double(n_sample);
    const double spread = 3.0 * std::sqrt(std::max(1.0, rank * (1.0 - q))) + 2.0;
    const int64_t lo_rank = int64_t(std::floor(rank - spread)), hi_rank = int64_t(std::ceil(rank + spread));
    lo = 0, hi = 0, hi_all = true;
    if (lo_rank > 0) {
      std::nth_element(s.sample.begin(), s.sample.begin() + lo_rank, s.sample.end());
      lo = s.sample[lo_rank];
    }
    if (hi_rank < n_sample) {
      std::nth_element(s.sample.begin() + std::max<int64_t>(lo_rank, 0), s.sample.begin() + hi_rank, s.sample.end());
      hi = s.sample[hi_rank];
      hi_all = false;
    }
    nb = collect(keys, w, lo, hi, hi_all, s.cand.data(), nc, s.next, s.next_bytes);
    if (!(nb <= k - 1 && k - 1 < nb + nc)) {  // the sample missed: every key is a candidate
      lo = 0;
      hi_all = true;
      nb = collect(keys, w, lo, hi, hi_all, s.cand.data(), nc, nullptr, 0);
    }
  }
  // The k-th key among the candidates: a histogram of (key - lo) over at most 1024 bins,
  // then nth_element inside the one bin that holds it.
  const uint64_t range = (hi_all ? (uint64_t(1) << 32) : uint64_t(hi)) - lo;
  int shift = 0;
  while ((range - 1) >> shift >= 1024) ++shift;
  const int64_t bins = int64_t((range - 1) >> shift) + 1;
  s.hist.assign(bins, 0);
  const int32_t* cand = s.cand.data();
  for (int64_t i = 0; i < nc; ++i) ++s.hist[(keys[cand[i]] - lo) >> shift];
  int64_t want = k - 1 - nb, before = 0, bin = 0;  // want: rank among the candidates
  while (before + s.hist[bin] <= want) before += s.hist[bin++];
  // The next chunk's window: bin edges that hold ranks k - 1 -+ 6 standard deviations
  // of the k-th's rank here (or this window's own bounds where the histogram ends).
  {
    const double q = double(k) / double(w);
    const int64_t margin = int64_t(6.0 * std::sqrt(double(w) * q * (1.0 - q))) + 16;
    int64_t b_lo = 0, cum = 0;
    while (b_lo < bins && nb + cum + int64_t(s.hist[b_lo]) <= k - 1 - margin) cum += s.hist[b_lo++];
    s.window_lo = uint32_t(lo + (uint64_t(b_lo) << shift));
    int64_t b_hi = b_lo;
    while (b_hi < bins && nb + cum < k + margin) cum += s.hist[b_hi++];
    const uint64_t edge = lo + (uint64_t(b_hi) << shift);
    s.window_hi_all = b_hi >= bins ? hi_all : false;
    s.window_hi = b_hi >= bins ? hi : uint32_t(edge);
    s.window_w = w, s.window_k = k;
  }
  s.bin_keys.clear();
  for (int64_t i = 0; i < nc; ++i) {
    const uint32_t key = keys[cand[i]];
    if (int64_t((key - lo) >> shift) == bin) s.bin_keys.push_back(key);
  }
  const int64_t at = want - before;
  std::nth_element(s.bin_keys.begin(), s.bin_keys.begin() + at, s.bin_keys.end());
  const uint32_t kth = s.bin_keys[at];
  int64_t less = nb + before, equal = 0;
  for (uint32_t key : s.bin_keys) {
    less += key < kth;
    equal += key == kth;
  }
  const int64_t need = k - less;  // entries equal to kth that are taken, lowest offset first
  if (need == equal) {
    emit(keys, w, kth, true, sel);
    return;
  }
  int64_t n = 0, taken = 0;
  for (int64_t i = 0; i < w; ++i) {  // ties split: the lower offsets win
    const uint32_t key = keys[i];
    if (key < kth || (key == kth && taken++ < need)) sel[n++] = int32_t(i);
  }
}

// to[i] = from[pos[i]], or 0 where pos[i] is -1 (a new entry). from may be to only
// when pos[i] == i everywhere (in place, unchanged chunk).
template <typename E>
void carry_bits(const E* from, E* to, const int32_t* __restrict pos, int64_t k) {
  for (int64_t i = 0; i < k; ++i) {
    const int32_t a = pos[i];
    to[i] = a >= 0 ? from[a] : E(0);
  }
}

// Both moments (E: their bits) and the int16 ages in one pass (carry_bits, carry_age).
template <typename E>
void carry_state(const char* const* from, char* const* to, const int32_t* __restrict pos, int64_t k, int64_t add,
                 int64_t cap) {
  const E* __restrict m0 = reinterpret_cast<const E*>(from[0]);
  const E* __restrict v0 = reinterpret_cast<const E*>(from[1]);
  const int16_t* __restrict age0 = reinterpret_cast<const int16_t*>(from[2]);
  E* __restrict m1 = reinterpret_cast<E*>(to[0]);
  E* __restrict v1 = reinterpret_cast<E*>(to[1]);
  int16_t* __restrict age1 = reinterpret_cast<int16_t*>(to[2]);
  for (int64_t i = 0; i < k; ++i) {  // branch-free: a new entry reads entry 0, then masks it to 0
    const int32_t a = pos[i];
    const int32_t keep = ~(a >> 31);  // all ones where the entry stays, 0 where it is new
    const int32_t at = a & keep;
    m1[i] = E(m0[at] & E(keep));
    v1[i] = E(v0[at] & E(keep));
    age1[i] = int16_t(std::min(int32_t(age0[at]) + int32_t(add), int32_t(cap)) & keep);
  }
}

// The ages: min(age + add, cap) where an entry stays, 0 where it is new.
template <typename E>
void carry_age(const E* from, E* to, const int32_t* __restrict pos, int64_t k, int64_t add, int64_t cap) {
  for (int64_t i = 0; i < k; ++i) {
    const int32_t a = pos[i];
    to[i] = a >= 0 ? E(std::min(int64_t(from[a]) + add, cap)) : E(0);
  }
}

// One tensor of a refresh, as the chunks see it.
struct Job {
  const void* src = nullptr;          // the values selected from (weights, or gradients)
  at::ScalarType dtype = at::kFloat;  // their dtype
  const int16_t* old16 = nullptr;     // the old mask: int16 chunk offsets,
  const int32_t* old32 = nullptr;     // or int32 flat indices (or neither: nothing carried)
  std::vector<const char*> from;      // the carried arrays, aligned with the old mask
  std::vector<char*> to;              // and where they go, aligned with the new one
  std::vector<int64_t> sizes;         // their element sizes (4 or 2 bytes)
  int16_t* out16 = nullptr;           // the new mask
  int32_t* out32 = nullptr;
  int64_t age_add = 0;
};

// One chunk: where it lies in its tensor, its k, and where its entries go.
struct Row {
  int64_t job, start, width, k, out_at, old_k, old_at;
};

template <typename T>
inline void keys_of(const T* x, int64_t w, uint32_t flip, uint32_t* keys) {
  for (int64_t i = 0; i < w; ++i) keys[i] = magnitude_key(x[i]) ^ flip;
}

// The carry of one chunk: its new entries' values from the old mask's.
void carry(const Job& job, const Row& row, const int32_t* __restrict sel, Scratch& s, int64_t age_at,
           int64_t age_cap) {
  // Each new entry's old position (-1: new), by rank in a bitmap of the old offsets:
  // an entry stays if its bit is set, and its old position is the number of bits below
  // it. Unlike a merge, every lookup is independent of the one before.
  const int64_t words = (row.width + 63) / 64;
  s.bits.assign(words, 0);
  s.below.resize(words + 1);
  uint64_t* __restrict bits = s.bits.data();
  if (job.old16) {
    const int16_t* __restrict o = job.old16 + row.old_at;
    for (int64_t a = 0; a < row.old_k; ++a) bits[o[a] >> 6] |= uint64_t(1) << (o[a] & 63);
  } else {
    const int32_t* __restrict o = job.old32 + row.old_at;
    const int64_t start = row.start;
    for (int64_t a = 0; a < row.old_k; ++a) {
      const int64_t off = o[a] - start;
      TORCH_CHECK(off >= 0 && off < row.width, "refresh: the old mask has an entry outside its chunk");
      bits[off >> 6] |= uint64_t(1) << (off & 63);
    }
  }
  int32_t* __restrict below = s.below.data();  // set bits in the words before each word
  below[0] = 0;
  for (int64_t wd = 0; wd < words; ++wd) below[wd + 1] = below[wd] + __builtin_popcountll(bits[wd]);
  int32_t* __restrict pos = s.cand.data();  // the candidates are done with
  int64_t paired_in_place = 0;
  for (int64_t i = 0; i < row.k; ++i) {
    const int32_t want = sel[i];
    const uint64_t word = bits[want >> 6];
    const int32_t bit = want & 63;
    const int32_t rank = below[want >> 6] + __builtin_popcountll(word & ((uint64_t(1) << bit) - 1));
    const int32_t stays = int32_t((word >> bit) & 1);
    pos[i] = rank | (stays - 1);  // -1 where new; branch-free, as entries come and go at random
    paired_in_place += stays & (rank == i);
  }
  const bool same = row.k == row.old_k && paired_in_place == row.k;  // this chunk's mask did not change
  if (row.old_k == 0) {  // nothing to carry: every entry is new
    for (size_t t = 0; t < job.from.size(); ++t) std::memset(job.to[t] + row.out_at * job.sizes[t], 0, row.k * job.sizes[t]);
    return;
  }
  // The usual state, moments of one size and int16 ages: one loop moves all three.
  const size_t n_values = job.from.size();
  if (!same && n_values == 3 && age_at == 2 && job.sizes[0] == job.sizes[1] && job.sizes[2] == 2) {
    const char* from[3];
    char* to[3];
    s.carried.resize(row.old_k * (2 * job.sizes[0] + 2));
    char* saved = s.carried.data();
    for (int t = 0; t < 3; ++t) {  // in place: the chunk's old values aside first
      from[t] = job.from[t] + row.old_at * job.sizes[t];
      to[t] = job.to[t] + row.out_at * job.sizes[t];
      if (from[t] == to[t]) {
        std::memcpy(saved, from[t], row.old_k * job.sizes[t]);
        from[t] = saved;
        saved += row.old_k * job.sizes[t];
      }
    }
    if (job.sizes[0] == 4) carry_state<uint32_t>(from, to, pos, row.k, job.age_add, age_cap);
    else carry_state<uint16_t>(from, to, pos, row.k, job.age_add, age_cap);
    return;
  }
  for (size_t t = 0; t < n_values; ++t) {
    const int64_t es = job.sizes[t];
    const char* from = job.from[t] + row.old_at * es;
    char* to = job.to[t] + row.out_at * es;
    const bool age = int64_t(t) == age_at;
    if (from == to && same && !age) continue;  // in place and unchanged: the moments stay
    if (from == to && !same) {  // in place: the chunk's old values aside first
      s.carried.resize(row.old_k * es);
      std::memcpy(s.carried.data(), from, row.old_k * es);
      from = s.carried.data();
    }
    if (age && es == 2) carry_age(reinterpret_cast<const int16_t*>(from), reinterpret_cast<int16_t*>(to), pos, row.k, job.age_add, age_cap);
    else if (age) carry_age(reinterpret_cast<const int32_t*>(from), reinterpret_cast<int32_t*>(to), pos, row.k, job.age_add, age_cap);
    else if (es == 4) carry_bits(reinterpret_cast<const uint32_t*>(from), reinterpret_cast<uint32_t*>(to), pos, row.k);
    else carry_bits(reinterpret_cast<const uint16_t*>(from), reinterpret_cast<uint16_t*>(to), pos, row.k);
  }
}

// The refresh of several tensors at once (every chunk of every tensor in one
// parallel loop). Per tensor i: sources[i] (flat, contiguous), runs[i] = (start,
// width, rows, k) per run of equal chunks, and when olds[i] is given (its old mask,
// stored form) old_runs[i] (the same chunks with the old k) and values[i], the
// arrays carried to the new mask (zero where an entry is new; the one at age_at, if
// >= 0, becomes min(age + age_adds[i], age_cap)). Returns per tensor the new mask
// (int16 chunk offsets or int32 flat indices) then the carried arrays. A tensor whose
// chunks keep their k gets its mask and carried arrays rewritten in place.
std::vector<std::vector<at::Tensor>> refresh(std::vector<at::Tensor> sources, std::vector<std::vector<int64_t>> runs,
                                             bool largest, std::vector<c10::optional<at::Tensor>> olds,
                                             std::vector<std::vector<int64_t>> old_runs,
                                             std::vector<std::vector<at::Tensor>> values, int64_t age_at,
                                             std::vector<int64_t> age_adds, int64_t age_cap, bool int16_out) {
  const size_t n = sources.size();
  TORCH_CHECK(runs.size() == n && olds.size() == n && old_runs.size() == n && values.size() == n &&
                  age_adds.size() == n, "refresh: argument lists differ in length");
  const at::ScalarType index_type = int16_out ? at::kShort : at::kInt;
  std::vector<std::vector<at::Tensor>> out(n);
  std::vector<Job> jobs(n);
  std::vector<Row> rows;
  for (size_t j = 0; j < n; ++j) {
    const at::Tensor& source = sources[j];
    const std::vector<int64_t>& run = runs[j];
    TORCH_CHECK(source.device().is_cpu() && source.is_contiguous(), "refresh: tensor ", j,
                " is not a contiguous CPU tensor");
    TORCH_CHECK(source.scalar_type() == at::kFloat || source.scalar_type() == at::kBFloat16 ||
                    source.scalar_type() == at::kHalf, "refresh: dtype ", source.scalar_type(), " is not supported");
    TORCH_CHECK(run.size() % 4 == 0, "refresh: runs come in fours (start, width, rows, k)");
    const at::Tensor* old = olds[j].has_value() ? &*olds[j] : nullptr;
    TORCH_CHECK(!old || old_runs[j].size() == run.size(), "refresh: tensor ", j, ": old_runs do not match runs");
    int64_t total = 0, old_total = 0;
    for (size_t r = 0; r < run.size(); r += 4) {
      TORCH_CHECK(run[r + 3] >= 1 && run[r + 3] <= run[r + 1], "refresh: k out of range");
      TORCH_CHECK(run[r + 1] <= 32768 || !int16_out, "refresh: int16 offsets need chunks of at most 2**15");
      TORCH_CHECK(run[r] + run[r + 1] * run[r + 2] <= source.numel(), "refresh: run beyond the tensor");
      const int64_t old_k = old ? old_runs[j][r + 3] : 0;
      TORCH_CHECK(!old || (old_runs[j][r] == run[r] && old_runs[j][r + 1] == run[r + 1] &&
                           old_runs[j][r + 2] == run[r + 2] && old_k >= 0 && old_k <= run[r + 1]),
                  "refresh: tensor ", j, ": the old mask's chunks differ from the new one's");
      for (int64_t i = 0; i < run[r + 2]; ++i) {
        rows.push_back({int64_t(j), run[r] + i * run[r + 1], run[r + 1], run[r + 3], total, old_k, old_total});
        total += run[r + 3];
        old_total += old_k;
      }
    }
    Job& job = jobs[j];
    job.src = source.data_ptr();
    job.dtype = source.scalar_type();
    if (old) {
      TORCH_CHECK(old->is_contiguous() && old->numel() == old_total &&
                      (old->scalar_type() == at::kShort || old->scalar_type() == at::kInt),
                  "refresh: tensor ", j, ": the old mask has ", old->numel(), " entries for ", old_total);
      if (old->scalar_type() == at::kShort) job.old16 = old->data_ptr<int16_t>();
      else job.old32 = old->data_ptr<int32_t>();
    } else {
      TORCH_CHECK(values[j].empty(), "refresh: tensor ", j, ": values to carry but no old mask");
    }
    // With the same k in every chunk the mask and the carried arrays are rewritten in
    // place: a refresh at an unchanged density allocates nothing.
    const bool in_place = old && old_total == total && old_runs[j] == run;
    out[j].push_back(in_place && old->scalar_type() == index_type
                         ? *old : at::empty({total}, source.options().dtype(index_type)));
    if (int16_out) job.out16 = out[j][0].data_ptr<int16_t>();
    else job.out32 = out[j][0].data_ptr<int32_t>();
    for (size_t t = 0; t < values[j].size(); ++t) {
      const at::Tensor& v = values[j][t];
      TORCH_CHECK(v.is_contiguous() && v.numel() == old_total && (v.element_size() == 4 || v.element_size() == 2),
                  "refresh: tensor ", j, ": carried array ", t, " does not match the old mask");
      TORCH_CHECK(int64_t(t) != age_at || v.scalar_type() == at::kShort || v.scalar_type() == at::kInt,
                  "refresh: ages must be int16 or int32");
      out[j].push_back(in_place ? v : at::empty({total}, v.options()));
      job.from.push_back(static_cast<const char*>(v.data_ptr()));
      job.to.push_back(static_cast<char*>(out[j].back().data_ptr()));
      job.sizes.push_back(v.element_size());
    }
    job.age_add = age_adds[j];
  }
  const uint32_t flip = largest ? 0xffffffffu : 0u;
  at::parallel_for(0, int64_t(rows.size()), 1, [&](int64_t lo, int64_t hi) {
    Scratch s;
    for (int64_t r = lo; r < hi; ++r) {
      const Row& row = rows[r];
      const Job& job = jobs[row.job];
      s.fit(row.width);
      // What the next chunk reads, fetched while this one is selected.
      s.next = nullptr;
      s.next_bytes = 0;
      if (r + 1 < hi) {
        const Row& nrow = rows[r + 1];
        const Job& njob = jobs[nrow.job];
        const int64_t es = at::elementSize(njob.dtype);
        s.next = static_cast<const char*>(njob.src) + nrow.start * es;
        s.next_bytes = nrow.width * es;
      }
      Keys keys{s.keys.data(), 0xffffffffu, 0u};
      switch (job.dtype) {
        case at::kFloat: keys = {static_cast<const uint32_t*>(job.src) + row.start, 0x7fffffffu, flip}; break;
        case at::kBFloat16: keys_of(static_cast<const at::BFloat16*>(job.src) + row.start, row.width, flip, s.keys.data()); break;
        default: keys_of(static_cast<const at::Half*>(job.src) + row.start, row.width, flip, s.keys.data()); break;
      }
      select_row(keys, row.width, row.k, s);
      const int32_t* sel = s.sel.data();
      if (job.old16 || job.old32) carry(job, row, sel, s, age_at, age_cap);
      // Written last: in place, the old mask is what the carry read.
      if (job.out16) {
        int16_t* __restrict o = job.out16 + row.out_at;
        for (int64_t i = 0; i < row.k; ++i) o[i] = int16_t(sel[i]);
      } else {
        int32_t* __restrict o = job.out32 + row.out_at;
        const int32_t start = int32_t(row.start);
        for (int64_t i = 0; i < row.k; ++i) o[i] = start + sel[i];
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step", &step, "One NanoAdam step over a list of CPU tensors");
  m.def("refresh", &refresh, "Per chunk, the k smallest (or largest) |x|, ties to the lower index; the carried values");
}
