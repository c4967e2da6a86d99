// SPDX-License-Identifier: Apache-2.0
// What the fuzz harnesses (fuzz_*.cpp) share: FuzzInput, which reads the input bytes as bounded
// integers, and make_tokens, which draws token sequences that often repeat earlier ones; FUZZ_CHECK, which reports a broken invariant and aborts; attempt(), which runs one
// operation that may be invalid and checks it throws exactly when expected, leaving the state as it
// was; and, unless TIDAL_LIBFUZZER is defined, a main() that drives LLVMFuzzerTestOneInput with
// random inputs or replays input files (gcc has no -fsanitize=fuzzer).
//
//   fuzz_scheduler -runs=2000 -seed=1          # 2000 random inputs from seed 1
//   fuzz_scheduler crash-0123abcd ...          # replay inputs (files, or every file of a directory)
//
// Flags (libFuzzer's names): -runs=N, -seed=S, -max_len=BYTES, -max_total_time=SECONDS (stop
// early, still passing), -artifact_prefix=PATH (where a failing input is written). A finding (a
// FUZZ_CHECK, an unexpected exception, a crash or a sanitizer report) writes the input to
// <artifact_prefix>crash-<hash> and prints how to replay it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tidal/status.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace tidal::fuzz {

using Ids = std::vector<int32_t>;

/// The input bytes as a stream of small integers (like LLVM's FuzzedDataProvider, but reading from
/// the front only): every read past the end returns 0, so any byte string decodes to a valid
/// sequence of operations.
class FuzzInput {
 public:
  FuzzInput(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  /// A value in [lo, hi] (lo <= hi), from as many bytes as the span needs.
  int64_t range(int64_t lo, int64_t hi) {
    const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
    uint64_t value = 0;
    for (uint64_t rest = span - 1; rest != 0; rest >>= 8) value = (value << 8) | byte();
    return lo + static_cast<int64_t>(span == 0 ? value : value % span);
  }
  int32_t range32(int64_t lo, int64_t hi) { return static_cast<int32_t>(range(lo, hi)); }
  /// True with probability num/den (den <= 256).
  bool chance(int num, int den) { return byte() % den < num; }
  template <typename T>
  const T& pick(const std::vector<T>& items) {
    return items[static_cast<size_t>(range(0, static_cast<int64_t>(items.size()) - 1))];
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Tokens from a small alphabet, often repeating an earlier sequence's prefix, so contents collide.
inline Ids make_tokens(FuzzInput& in, std::vector<Ids>& history, size_t n, int32_t vocab) {
  Ids out;
  if (!history.empty() && in.chance(2, 3)) {
    const Ids& prev = in.pick(history);
    out.assign(prev.begin(), prev.begin() + static_cast<ptrdiff_t>(std::min(n, prev.size())));
  }
  while (out.size() < n) out.push_back(in.range32(0, vocab - 1));
  if (history.size() < 16) history.push_back(out);
  else history[in.range(0, 15)] = out;
  return out;
}

[[noreturn]] inline void fail(const char* file, int line, const char* cond, const std::string& message) {
  std::fprintf(stderr, "\nFUZZ FINDING %s:%d: (%s) %s\n", detail::basename(file), line, cond,
               message.c_str());
  std::fflush(stderr);
  std::abort();
}

/// Which exceptions an operation may throw: kOk = none (it must succeed).
enum Expect : unsigned {
  kOk = 0,
  kInvalid = 1,  // std::invalid_argument
  kIndex = 2,    // std::out_of_range
  kState = 4,    // tidal::Error
};

inline std::string expect_name(unsigned expect) {
  if (expect == kOk) return "success";
  std::string out;
  if (expect & kInvalid) out += "invalid_argument|";
  if (expect & kIndex) out += "out_of_range|";
  if (expect & kState) out += "tidal::Error|";
  out.pop_back();
  return out;
}

}  // namespace tidal::fuzz

#define FUZZ_CHECK(cond, ...)                                                                   \
  do {                                                                                          \
    if (!(cond)) ::tidal::fuzz::fail(__FILE__, __LINE__, #cond, ::tidal::detail::str_cat(__VA_ARGS__)); \
  } while (0)

namespace tidal::fuzz {

/// Runs `op`, whose expected outcome is `expect` (kOk, or the exception types it may throw). The
/// three documented error types are caught; anything else propagates and is a finding. When it
/// throws, `snapshot()` taken before and after must be equal: an invalid call changes nothing.
/// Returns true when `op` completed.
template <typename Op, typename Snapshot>
bool attempt(const char* what, unsigned expect, Op&& op, Snapshot&& snapshot) {
  decltype(snapshot()) before{};
  if (expect != kOk) before = snapshot();  // NOTE(tidal): only then: a surprise throw is a finding anyway
  unsigned got = kOk;
  std::string message;
  try {
    op();
  } catch (const std::invalid_argument& e) {
    got = kInvalid;
    message = e.what();
  } catch (const std::out_of_range& e) {
    got = kIndex;
    message = e.what();
  } catch (const tidal::Error& e) {
    got = kState;
    message = e.what();
  }
  FUZZ_CHECK((got == kOk) == (expect == kOk) && (got == kOk || (got & expect) != 0), what, ": got ",
             expect_name(got), " (", message, "), expected ", expect_name(expect));
  if (got != kOk) FUZZ_CHECK(snapshot() == before, what, " threw (", message, ") and changed the state");
  return got == kOk;
}

/// Flattens values into a vector<int64_t>, for snapshots compared with ==.
struct Flat {
  std::vector<int64_t> v;
  void add(int64_t x) { v.push_back(x); }
  template <typename Range>
  void add_all(const Range& range) {
    v.push_back(static_cast<int64_t>(std::size(range)));
    for (const auto& x : range) v.push_back(static_cast<int64_t>(x));
  }
};

/// Per-harness path counters, so a run can show it reached what it is meant to stress. Each harness
/// defines fuzz_report(): it prints them and returns false when `require` and a path was never hit.
bool fuzz_report(bool require);

}  // namespace tidal::fuzz

#ifndef TIDAL_LIBFUZZER
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>

namespace tidal::fuzz::driver {

// The input being run, for the crash handler (a signal handler may only touch plain globals).
inline std::vector<uint8_t> g_input;
inline std::string g_artifact_prefix;
inline std::string g_replay_hint;  // how to reproduce the input without its file
inline volatile sig_atomic_t g_dumped = 0;

inline void write_all(int fd, const char* s, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, s, n);
    if (w <= 0) return;
    s += w;
    n -= static_cast<size_t>(w);
  }
}
inline void write_str(int fd, const char* s) { write_all(fd, s, std::strlen(s)); }

// Async-signal-safe: writes the current input to <prefix>crash-<fnv1a64 hex> and says so.
inline void dump_input() {
  if (g_dumped) return;
  g_dumped = 1;
  uint64_t h = 0xcbf29ce484222325ULL;
  for (uint8_t b : g_input) h = (h ^ b) * 0x100000001b3ULL;
  char path[4096];
  size_t n = std::min<size_t>(g_artifact_prefix.size(), sizeof(path) - 32);
  std::memcpy(path, g_artifact_prefix.data(), n);
  std::memcpy(path + n, "crash-", 6);
  n += 6;
  for (int i = 15; i >= 0; --i) path[n++] = "0123456789abcdef"[(h >> (4 * i)) & 0xf];
  path[n] = '\0';
  const int fd = ::open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    write_all(fd, reinterpret_cast<const char*>(g_input.data()), g_input.size());
    ::close(fd);
  }
  write_str(2, "\n==fuzz== failing input written to ");
  write_str(2, path);
  write_str(2, "\n==fuzz== replay: <this executable> ");
  write_str(2, path);
  write_str(2, "\n");
  if (!g_replay_hint.empty()) {
    write_str(2, "==fuzz== or regenerate it: ");
    write_str(2, g_replay_hint.c_str());
    write_str(2, "\n");
  }
}

inline void on_signal(int sig) {
  dump_input();
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

}  // namespace tidal::fuzz::driver

// Declared weak: present in the sanitizer runtimes (gcc's libasan/libubsan), null otherwise. The
// callback runs when a sanitizer reports an error and is about to end the process.
extern "C" void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));
// NOTE(tidal): gcc links UBSan as its own runtime beside ASan's, and the death callback set above
// (ASan's) is not called on a UBSan error: UBSan aborts instead of exiting, so the SIGABRT handler
// writes the input. An abort_on_error in UBSAN_OPTIONS overrides this default.
extern "C" const char* __ubsan_default_options() { return "abort_on_error=1"; }

int main(int argc, char** argv) {
  using namespace tidal::fuzz::driver;
  int64_t runs = 1000;
  uint64_t seed = 1;
  size_t max_len = 4096;
  double max_total_time = 0;
  std::vector<std::string> paths;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* flag) -> const char* {
      const size_t n = std::strlen(flag);
      return arg.compare(0, n, flag) == 0 ? arg.c_str() + n : nullptr;
    };
    if (const char* v = value("-runs=")) runs = std::strtoll(v, nullptr, 10);
    else if (const char* v = value("-seed=")) seed = std::strtoull(v, nullptr, 10);
    else if (const char* v = value("-max_len=")) max_len = std::strtoull(v, nullptr, 10);
    else if (const char* v = value("-max_total_time=")) max_total_time = std::strtod(v, nullptr);
    else if (const char* v = value("-artifact_prefix=")) g_artifact_prefix = v;
    else if (!arg.empty() && arg[0] == '-') {
      std::fprintf(stderr, "unknown flag %s (flags: -runs= -seed= -max_len= -max_total_time= -artifact_prefix=)\n",
                   arg.c_str());
      return 2;
    } else {
      paths.push_back(arg);
    }
  }
  for (int sig : {SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL}) ::signal(sig, on_signal);
  if (__sanitizer_set_death_callback != nullptr) __sanitizer_set_death_callback(dump_input);

  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };

  if (!paths.empty()) {
    // Replay: every file named, or every regular file of a directory named.
    std::vector<std::string> files;
    for (const std::string& p : paths) {
      struct stat st {};
      if (::stat(p.c_str(), &st) != 0) {
        std::fprintf(stderr, "cannot read %s\n", p.c_str());
        return 2;
      }
      if (!S_ISDIR(st.st_mode)) {
        files.push_back(p);
        continue;
      }
      std::vector<std::string> in_dir;
      if (DIR* dir = ::opendir(p.c_str())) {
        while (dirent* e = ::readdir(dir)) {
          const std::string f = p + "/" + e->d_name;
          if (e->d_name[0] != '.' && ::stat(f.c_str(), &st) == 0 && S_ISREG(st.st_mode)) in_dir.push_back(f);
        }
        ::closedir(dir);
      }
      std::sort(in_dir.begin(), in_dir.end());
      files.insert(files.end(), in_dir.begin(), in_dir.end());
    }
    for (const std::string& f : files) {
      std::ifstream in(f, std::ios::binary);
      g_input.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
      g_replay_hint.clear();
      std::fprintf(stderr, "running %s (%zu bytes)\n", f.c_str(), g_input.size());
      LLVMFuzzerTestOneInput(g_input.data(), g_input.size());
    }
    std::fprintf(stderr, "%zu input(s) replayed in %.1f s, no finding\n", files.size(), elapsed());
    tidal::fuzz::fuzz_report(false);
    return 0;
  }

  // Random inputs: input i depends only on (seed, i). Lengths are spread so that short inputs
  // (few operations, simple states) and long ones (deep states) both occur often.
  int64_t done = 0;
  for (; done < runs; ++done) {
    if (max_total_time > 0 && elapsed() > max_total_time) break;
    std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(done));
    const size_t cap = std::max<size_t>(1, max_len >> (rng() % 6));
    g_input.resize(static_cast<size_t>(rng() % (cap + 1)));
    for (size_t j = 0; j < g_input.size(); j += 8) {
      const uint64_t r = rng();
      std::memcpy(g_input.data() + j, &r, std::min<size_t>(8, g_input.size() - j));
    }
    g_replay_hint = std::string(argv[0]) + " -seed=" + std::to_string(seed) + " -max_len=" +
                    std::to_string(max_len) + " -runs=" + std::to_string(done + 1) +
                    " (the last input)";
    LLVMFuzzerTestOneInput(g_input.data(), g_input.size());
  }
  std::fprintf(stderr, "%lld random input(s) (-seed=%llu -max_len=%zu) in %.1f s, no finding%s\n",
               static_cast<long long>(done), static_cast<unsigned long long>(seed), max_len, elapsed(),
               done < runs ? " (stopped by -max_total_time)" : "");
  // Enough inputs must reach every path the harness counts, or the run tests less than it claims.
  return tidal::fuzz::fuzz_report(done >= 200) ? 0 : 1;
}
#endif  // TIDAL_LIBFUZZER
