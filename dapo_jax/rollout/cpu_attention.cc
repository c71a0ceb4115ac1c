// Decode-step attention for XLA:CPU, called through XLA's FFI (`cpu_attention.py` builds and registers it).
//
// One token per decode slot: its query heads and key are rotated by position (RoPE), its key and value are
// written into the slot's pages of the paged KV cache in place, and its queries attend to the slot's cached keys
// and values. XLA:CPU runs that attention as a gather of the slot's pages and two batched matrix products over
// (slot, KV head) of a few rows each, which its YNNPACK backend executes on one core, reading every gathered
// entry, visible or not. This kernel reads only the entries a slot can see, straight from its pages, keeps the
// accumulators of all the group's query heads in vector registers (so each key and value is read once), and
// shares the (slot, KV head) pairs between the calling thread and XLA's intra-op thread pool. The rotation and
// the cache writes, done here, were five small XLA operations per layer and step.
//
// Layouts (decode_state.py's CPU pool): qkv [slots, kv_heads, group + 2, head_dim] (per KV head its group of
// query heads, then its key, then its value, before RoPE), cos and sin [slots, head_dim] (the rotate-half tables
// of each slot's position), keys [kv_heads, num_pages, head_dim, page_size] (each page's keys transposed),
// values [kv_heads, num_pages, page_size, head_dim], lengths [slots] int32 (the cache index of the token being
// fed: entries 0 .. lengths[slot] are visible once it is written), page_table [slots, table_width] int32 (entry
// j: the page of the slot's entries j * page_size ...; a write to an entry whose page is out of the pool, or past
// the table, is dropped). The results are the attention output [slots, kv_heads, group, head_dim] and the keys
// and values, updated in place (XLA aliases them to the inputs). The arithmetic is qwen2.apply_rotary's and
// paged_attention.py's: x cos + rotate_half(x) sin, then float32 scores q . k / sqrt(head_dim), a softmax over
// the visible entries (maximum subtracted, normalised), then the probability-weighted sum of the values, in
// position order whatever the pages (so the page size and the pages a slot holds do not change a result).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Floats per vector and the vector accumulators a pass may keep, for the machine's vector registers: AVX-512 has
// 32 of 16 floats, AVX2 16 of 8, NEON 32 of 4, SSE 16 of 4. (Vectors wider than the registers compile, split,
// but a pass's accumulators then spill to memory: on an AVX2 machine 16-float vectors made the kernel several
// times slower, and slower than XLA's attention; docs/benchmarks.md.)
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
constexpr int64_t kRegisters = 24;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
constexpr int64_t kRegisters = 12;
#elif defined(__aarch64__)
constexpr int64_t kLanes = 4;
constexpr int64_t kRegisters = 24;
#else
constexpr int64_t kLanes = 4;
constexpr int64_t kRegisters = 12;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float UnalignedVec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// exp(x) for x <= 0, lane by lane: 2^(x log2 e) as an integer power of two (added to the exponent bits) times
// 2^f, f in [-0.5, 0.5], by a degree-6 polynomial (relative error below 2e-7); 0 at and below -87 (and for -inf,
// the masked entries), where float32 exp is below 2e-38 anyway.
inline Vec ExpNonPositive(Vec x) {
  const Vec low = Vec{} - 87.0f;
  const Vec clamped = x > low ? x : low;
  const Vec t = clamped * 1.44269504088896341f;
  const Vec n = (t + 12582912.0f) - 12582912.0f;  // t rounded to the nearest integer (1.5 * 2^23 trick)
  const Vec f = t - n;
  Vec p = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  IntVec bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += __builtin_convertvector(n, IntVec) << 23;
  Vec result;
  std::memcpy(&result, &bits, sizeof(result));
  return x > low ? result : Vec{};
}

inline Vec LoadFull(const float* data) { return *reinterpret_cast<const UnalignedVec*>(data); }

struct Problem {
  const float* qkv;
  const float* cos;
  const float* sin;
  float* keys;
  float* values;
  const int32_t* lengths;
  const int32_t* page_table;
  float* out;
  int64_t kv_heads, num_pages, page_size, table_width;
};

// Scores of N vectors of positions for all G query heads of one (slot, KV head) pair, from a page's key block
// `keys` [D, page_size] whose column 0 is the first position scored: scores[g * row + j] = scale * (q[g] .
// keys[:, j * kLanes ...]). Every vector lies within the page (page_size is a multiple of kLanes).
template <int G, int D, int64_t N>
inline void ScoreVectors(const float* __restrict__ q, const float* __restrict__ keys, int64_t page_size,
                         float scale, Vec* __restrict__ scores, int64_t row) {
  Vec acc[G][N];
  for (int g = 0; g < G; ++g)
    for (int64_t j = 0; j < N; ++j) acc[g][j] = Vec{};
  for (int64_t i = 0; i < D; ++i) {
    const float* krow = keys + i * page_size;
    Vec key[N];
    for (int64_t j = 0; j < N; ++j) key[j] = LoadFull(krow + j * kLanes);
    for (int g = 0; g < G; ++g) {
      const float qi = q[g * D + i];
      for (int64_t j = 0; j < N; ++j) acc[g][j] += qi * key[j];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int64_t j = 0; j < N; ++j) scores[g * row + j] = acc[g][j] * scale;
}

// ScoreVectors for a count n of vectors known only at run time (1 <= n <= N).
template <int G, int D, int64_t N>
inline void ScoreVectorsUpTo(int64_t n, const float* q, const float* keys, int64_t page_size, float scale,
                             Vec* scores, int64_t row) {
  if constexpr (N >= 1) {
    if (n == N) return ScoreVectors<G, D, N>(q, keys, page_size, scale, scores, row);
    ScoreVectorsUpTo<G, D, N - 1>(n, q, keys, page_size, scale, scores, row);
  }
}

// One (slot, KV head) pair: G query heads of size D (a multiple of kLanes: C vectors). `scratch` holds G rows of
// scores, each table_width * page_size / kLanes vectors.
template <int G, int D>
void AttendPair(const Problem& p, int64_t pair, Vec* __restrict__ scratch) {
  static_assert(D % kLanes == 0, "head sizes are whole vectors");
  constexpr int64_t d = D;
  constexpr int64_t C = D / kLanes;
  const int64_t page_size = p.page_size, num_pages = p.num_pages;
  const int64_t capacity = p.table_width * page_size;  // entries the slot's page table can address
  const int64_t slot = pair / p.kv_heads, head = pair % p.kv_heads;
  const int64_t length = p.lengths[slot];
  const int64_t visible = std::clamp<int64_t>(length + 1, 1, capacity);
  const int64_t blocks = (visible + kLanes - 1) / kLanes;  // vectors of scores per query head
  const int64_t row = capacity / kLanes;
  const int64_t vectors_per_page = page_size / kLanes;
  const int32_t* table = p.page_table + slot * p.table_width;
  // The page holding column `column` of the table, clamped into the pool (entries past the visible ones may be
  // anything; they are never read, but a clamped index keeps every address inside the pool).
  auto page_at = [&](int64_t column) { return std::clamp<int64_t>(table[column], 0, num_pages - 1); };
  auto key_block = [&](int64_t page) { return p.keys + (head * num_pages + page) * d * page_size; };
  auto value_block = [&](int64_t page) { return p.values + (head * num_pages + page) * page_size * d; };
  float* __restrict__ out = p.out + pair * G * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));

  // RoPE on the G query heads and the key: x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1].
  const float* __restrict__ qkv = p.qkv + pair * (G + 2) * d;
  const float* __restrict__ cos = p.cos + slot * d;
  const float* __restrict__ sin = p.sin + slot * d;
  alignas(64) float rotated[(G + 1) * D];
  for (int g = 0; g <= G; ++g) {
    const float* x = qkv + g * d;
    float* r = rotated + g * d;
    for (int64_t i = 0; i < d / 2; ++i) r[i] = x[i] * cos[i] + (-x[i + d / 2]) * sin[i];
    for (int64_t i = d / 2; i < d; ++i) r[i] = x[i] * cos[i] + x[i - d / 2] * sin[i];
  }
  const float* __restrict__ q = rotated;
  // The fed token's key and value go to entry `length`, unless the table has no page there (a free slot, a
  // response past its end): such a write is dropped.
  if (length >= 0 && length < capacity && table[length / page_size] >= 0 &&
      table[length / page_size] < num_pages) {
    const int64_t page = table[length / page_size], offset = length % page_size;
    const float* key = rotated + G * d;
    const float* value = qkv + (G + 1) * d;
    float* keys = key_block(page);
    for (int64_t i = 0; i < d; ++i) keys[i * page_size + offset] = key[i];
    std::memcpy(value_block(page) + offset * d, value, d * sizeof(float));
  }

  // Scores, page by page, KB vectors of positions at a time (a contiguous run of each key row of the page) for
  // all G query heads; the last pass of a page takes the vectors left over.
  constexpr int64_t KB = std::max<int64_t>(1, kRegisters / G);
  for (int64_t first = 0; first < blocks; first += vectors_per_page) {
    const float* keys = key_block(page_at(first / vectors_per_page));
    const int64_t count = std::min(vectors_per_page, blocks - first);
    int64_t b0 = 0;
    for (; b0 + KB <= count; b0 += KB)
      ScoreVectors<G, D, KB>(q, keys + b0 * kLanes, page_size, scale, scratch + first + b0, row);
    if (b0 < count)
      ScoreVectorsUpTo<G, D, KB - 1>(count - b0, q, keys + b0 * kLanes, page_size, scale, scratch + first + b0,
                                     row);
  }

  // Softmax over each query head's visible entries (the last vector's entries past `visible` are masked out).
  const int64_t tail = visible - (blocks - 1) * kLanes;
  Vec tail_mask;
  for (int64_t i = 0; i < kLanes; ++i) tail_mask[i] = i < tail ? 0.0f : -std::numeric_limits<float>::infinity();
  for (int g = 0; g < G; ++g) {
    Vec* __restrict__ s = scratch + g * row;
    s[blocks - 1] += tail_mask;
    Vec best_lanes = s[0];
    for (int64_t b = 1; b < blocks; ++b) best_lanes = best_lanes > s[b] ? best_lanes : s[b];
    float best = best_lanes[0];
    for (int64_t i = 1; i < kLanes; ++i) best = std::max(best, best_lanes[i]);
    Vec total_lanes = Vec{};
    for (int64_t b = 0; b < blocks; ++b) {
      s[b] = ExpNonPositive(s[b] - best);
      total_lanes += s[b];
    }
    float total = 0.0f;
    for (int64_t i = 0; i < kLanes; ++i) total += total_lanes[i];
    const float inverse = 1.0f / total;
    for (int64_t b = 0; b < blocks; ++b) s[b] *= inverse;
  }

  // Weighted sums of the values, CB vectors of features at a time, position by position (page by page).
  constexpr int64_t CB = std::min<int64_t>(C, std::max<int64_t>(1, kRegisters / G));
  for (int64_t c0 = 0; c0 < C; c0 += CB) {
    Vec acc[G][CB];
    for (int g = 0; g < G; ++g)
      for (int64_t j = 0; j < CB; ++j) acc[g][j] = Vec{};
    const int64_t width = std::min<int64_t>(CB, C - c0);  // vectors in this pass
    for (int64_t start = 0; start < visible; start += page_size) {
      const float* values = value_block(page_at(start / page_size));
      const int64_t stop = std::min(visible, start + page_size);
      for (int64_t t = start; t < stop; ++t) {
        const float* vrow = values + (t - start) * d + c0 * kLanes;
        Vec value[CB];
        for (int64_t j = 0; j < CB; ++j) value[j] = j < width ? LoadFull(vrow + j * kLanes) : Vec{};
        for (int g = 0; g < G; ++g) {
          const float weight = reinterpret_cast<const float*>(scratch + g * row)[t];
          for (int64_t j = 0; j < CB; ++j) acc[g][j] += weight * value[j];
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int64_t j = 0; j < width; ++j) std::memcpy(out + g * d + (c0 + j) * kLanes, &acc[g][j], sizeof(Vec));
  }
}

using PairFunction = void (*)(const Problem&, int64_t, Vec*);

template <int G>
PairFunction ForHeadDim(int64_t head_dim) {
  switch (head_dim) {
    case 16: return AttendPair<G, 16>;
    case 32: return AttendPair<G, 32>;
    case 64: return AttendPair<G, 64>;
    case 128: return AttendPair<G, 128>;
    case 256: return AttendPair<G, 256>;
    default: return nullptr;
  }
}

// The kernel for a group size and head size (cpu_attention.py's SUPPORTED_* list the same), or nullptr.
PairFunction PairFunctionFor(int64_t group, int64_t head_dim) {
  switch (group) {
    case 1: return ForHeadDim<1>(head_dim);
    case 2: return ForHeadDim<2>(head_dim);
    case 3: return ForHeadDim<3>(head_dim);
    case 4: return ForHeadDim<4>(head_dim);
    case 5: return ForHeadDim<5>(head_dim);
    case 6: return ForHeadDim<6>(head_dim);
    case 7: return ForHeadDim<7>(head_dim);
    case 8: return ForHeadDim<8>(head_dim);
    default: return nullptr;
  }
}

// The pairs of one call, shared by the calling thread and the pool's helpers: each claims pairs from `next` one
// at a time, and the call returns once `done` counts them all. A helper that starts after every pair is claimed
// finds nothing to do; the shared pointer keeps this state alive until the last helper has looked.
struct SharedWork {
  Problem problem;
  PairFunction attend;
  int64_t num_pairs, scratch_vectors;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    std::vector<Vec> scratch(scratch_vectors);
    for (int64_t pair = next.fetch_add(1); pair < num_pairs; pair = next.fetch_add(1)) {
      attend(problem, pair, scratch.data());
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cos,
                           ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                           ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> page_table,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> keys_out,
                           ffi::ResultBuffer<ffi::F32> values_out) {
  const auto qkv_shape = qkv.dimensions();
  const auto key_shape = keys.dimensions();
  const auto value_shape = values.dimensions();
  const auto table_shape = page_table.dimensions();
  if (qkv_shape.size() != 4 || key_shape.size() != 4 || value_shape.size() != 4 || cos.dimensions().size() != 2 ||
      sin.dimensions().size() != 2 || lengths.dimensions().size() != 1 || table_shape.size() != 2) {
    return ffi::Error::InvalidArgument(
        "decode attention: expected 4-D qkv, keys and values, 2-D cos, sin and page table, and 1-D lengths");
  }
  const int64_t slots = qkv_shape[0], kv_heads = qkv_shape[1], group = qkv_shape[2] - 2, head_dim = qkv_shape[3];
  const int64_t num_pages = key_shape[1], page_size = key_shape[3], table_width = table_shape[1];
  if (key_shape[0] != kv_heads || key_shape[2] != head_dim || value_shape[0] != kv_heads ||
      value_shape[1] != num_pages || value_shape[2] != page_size || value_shape[3] != head_dim ||
      cos.dimensions()[0] != slots || cos.dimensions()[1] != head_dim || sin.dimensions()[0] != slots ||
      sin.dimensions()[1] != head_dim || lengths.dimensions()[0] != slots || table_shape[0] != slots ||
      num_pages < 1 || table_width < 1) {
    return ffi::Error::InvalidArgument(
        "decode attention: qkv, cos, sin, keys, values, lengths and page table disagree in shape");
  }
  if (page_size % kLanes != 0) {
    return ffi::Error::InvalidArgument("decode attention: the page size must be a multiple of the vector width (16 floats at most)");
  }
  const PairFunction attend = PairFunctionFor(group, head_dim);
  if (attend == nullptr) {
    return ffi::Error::InvalidArgument(
        "decode attention: needs 1 to 8 query heads per KV head and a head size of 16, 32, 64, 128 or 256");
  }
  // The pool is updated in place: XLA gives the results the inputs' buffers (input_output_aliases). Should it
  // ever not, the results start as copies of the inputs.
  if (keys_out->typed_data() != keys.typed_data())
    std::memcpy(keys_out->typed_data(), keys.typed_data(), keys.size_bytes());
  if (values_out->typed_data() != values.typed_data())
    std::memcpy(values_out->typed_data(), values.typed_data(), values.size_bytes());
  auto work = std::make_shared<SharedWork>();
  work->problem = Problem{qkv.typed_data(),       cos.typed_data(),         sin.typed_data(),
                          keys_out->typed_data(),  values_out->typed_data(), lengths.typed_data(),
                          page_table.typed_data(), out->typed_data(),        kv_heads,
                          num_pages,               page_size,                table_width};
  work->attend = attend;
  work->num_pairs = slots * kv_heads;
  work->scratch_vectors = group * (table_width * page_size / kLanes);
  const int64_t helpers = std::min<int64_t>(thread_pool.num_threads(), work->num_pairs) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    thread_pool.Schedule([work] { work->Run(); });
  }
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->num_pairs) {
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DapoDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin
                                  .Arg<ffi::Buffer<ffi::F32>>()   // keys
                                  .Arg<ffi::Buffer<ffi::F32>>()   // values
                                  .Arg<ffi::Buffer<ffi::S32>>()   // lengths
                                  .Arg<ffi::Buffer<ffi::S32>>()   // page table
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // keys, updated (aliases the input)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // values, updated (aliases the input)
