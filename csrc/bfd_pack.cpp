// Best-fit decreasing bin packing of sample lengths into rows of `capacity` tokens.
//
// The caller sorts the lengths (descending, ties by index) and gets back the row of each sorted
// item. Each item goes into the open row with the least remaining room that still fits it; ties
// go to the row that reached that remaining room last (a stack per remaining-room value). The
// non-empty stacks are tracked by a two-level bitset, so finding the best row is a scan of a few
// words instead of a tree walk: O(n * capacity / 4096) worst case, a few ns per item in practice.
// packtune/data/packing.py holds the same algorithm in Python (its reference and fallback).
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace {

class RoomIndex {
 public:
  explicit RoomIndex(int64_t capacity)
      : stacks_(capacity + 1), words_((capacity + 64) / 64, 0), summary_((words_.size() + 63) / 64, 0) {}

  // The smallest room >= need with a row on its stack, or -1.
  int64_t find(int64_t need) const {
    int64_t w = need >> 6;
    if (w >= static_cast<int64_t>(words_.size())) return -1;
    uint64_t bits = words_[w] & (~uint64_t(0) << (need & 63));
    if (bits) return (w << 6) + __builtin_ctzll(bits);
    int64_t s = (w + 1) >> 6;
    if (s >= static_cast<int64_t>(summary_.size())) return -1;
    uint64_t sbits = ((w + 1) & 63) ? summary_[s] & (~uint64_t(0) << ((w + 1) & 63)) : summary_[s];
    while (!sbits) {
      if (++s >= static_cast<int64_t>(summary_.size())) return -1;
      sbits = summary_[s];
    }
    int64_t word = (s << 6) + __builtin_ctzll(sbits);
    return (word << 6) + __builtin_ctzll(words_[word]);
  }

  int64_t pop(int64_t room) {
    auto& stack = stacks_[room];
    int64_t row = stack.back();
    stack.pop_back();
    if (stack.empty()) {
      words_[room >> 6] &= ~(uint64_t(1) << (room & 63));
      if (!words_[room >> 6]) summary_[room >> 12] &= ~(uint64_t(1) << ((room >> 6) & 63));
    }
    return row;
  }

  void push(int64_t room, int64_t row) {
    if (room <= 0) return;  // a full row never takes another item (lengths are >= 1)
    stacks_[room].push_back(row);
    words_[room >> 6] |= uint64_t(1) << (room & 63);
    summary_[room >> 12] |= uint64_t(1) << ((room >> 6) & 63);
  }

 private:
  std::vector<std::vector<int64_t>> stacks_;
  std::vector<uint64_t> words_;
  std::vector<uint64_t> summary_;
};

at::Tensor bfd_pack(const at::Tensor& sorted_lengths, int64_t capacity) {
  TORCH_CHECK(sorted_lengths.dim() == 1 && sorted_lengths.scalar_type() == at::kLong &&
                  sorted_lengths.device().is_cpu(),
              "bfd_pack: expected a 1-D int64 CPU tensor of lengths");
  TORCH_CHECK(capacity >= 1, "bfd_pack: capacity must be positive");
  auto lengths = sorted_lengths.contiguous();
  const int64_t n = lengths.numel();
  const int64_t* len = lengths.data_ptr<int64_t>();
  auto rows = at::empty({n}, lengths.options());
  int64_t* row_of = rows.data_ptr<int64_t>();
  RoomIndex index(capacity);
  int64_t n_rows = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t need = len[i];
    TORCH_CHECK(need >= 1 && need <= capacity, "bfd_pack: length ", need, " at position ", i,
                " is outside [1, ", capacity, "]");
    TORCH_CHECK(i == 0 || len[i - 1] >= need, "bfd_pack: lengths must be sorted in descending order");
    int64_t room = index.find(need);
    int64_t row;
    if (room < 0) {
      row = n_rows++;
      room = capacity;
    } else {
      row = index.pop(room);
    }
    row_of[i] = row;
    index.push(room - need, row);
  }
  return rows;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(packtune, m) {
  m.def("bfd_pack(Tensor sorted_lengths, int capacity) -> Tensor");
  m.impl("bfd_pack", c10::DispatchKey::CPU, TORCH_FN(bfd_pack));
}
