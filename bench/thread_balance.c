/* How evenly TVM's static split of each parallel kernel shares the work between threads, and whether
 * sharing it at run time would be faster: a probe, loaded beside an artifact by bench/thread_balance.py.
 *
 * A compiled kernel's parallel loop asks TVM's thread pool for T tasks through the library's
 * __TVMBackendParallelLaunch pointer, and task t runs the t-th contiguous chunk of ceil(extent / T)
 * iterations (the chunk is computed in the kernel from penv->num_task). tvmnet_install points that pointer
 * at balanced_launch, which launches the same T threads on `worker` below. With `slices` S, it tells the
 * kernel there are T * S tasks: thread t owns tasks [t * S, (t + 1) * S), runs them from the front, then
 * takes what is left of the others' from the back, so a thread that finishes early helps the slower one
 * while each thread still writes one contiguous band. S = 1 is TVM's own split, timed by the same code.
 * Kernels that call TVMBackendParallelBarrier must not be sliced: the Python side refuses such a library.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*ParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
typedef int (*ParallelLaunch)(ParallelLambda lambda, void* cdata, int num_task);

#define MAX_THREADS 64

static ParallelLaunch tvm_launch;
static int slices = 1;

/* Sums over launches since the last tvmnet_stats call, on 2 or more threads. */
static double busy_seconds[MAX_THREADS], start_lag_seconds[MAX_THREADS], spread_seconds, launch_seconds;
static long launches, last_to_finish[MAX_THREADS];
static int stats_threads;

typedef struct {
  ParallelLambda kernel;
  void* cdata;
  _Atomic uint64_t taken[MAX_THREADS]; /* per owner: tasks taken from the front (low half), the back (high) */
  _Atomic int error;
  double launched, began[MAX_THREADS], finished[MAX_THREADS];
  int threads;
} Job;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The next task of `owner`'s range, from its front or its back; -1 when the range is used up. */
static int take(Job* job, int owner, int from_front) {
  uint64_t old = atomic_load_explicit(&job->taken[owner], memory_order_relaxed);
  for (;;) {
    uint32_t front = (uint32_t)old, back = (uint32_t)(old >> 32);
    if (front + back >= (uint32_t)slices) return -1;
    uint64_t next = old + (from_front ? 1 : ((uint64_t)1 << 32));
    if (atomic_compare_exchange_weak_explicit(&job->taken[owner], &old, next, memory_order_acq_rel,
                                              memory_order_relaxed))
      return from_front ? owner * slices + (int)front : (owner + 1) * slices - 1 - (int)back;
  }
}

static void run_range(Job* job, int owner, int from_front, TVMParallelGroupEnv* env) {
  int task;
  while ((task = take(job, owner, from_front)) >= 0) {
    int rc = job->kernel(task, env, job->cdata);
    if (rc) atomic_store(&job->error, rc);
  }
}

static int worker(int task_id, TVMParallelGroupEnv* penv, void* cdata) {
  Job* job = (Job*)cdata;
  job->began[task_id] = now();
  int threads = penv->num_task;
  TVMParallelGroupEnv env = {penv->sync_handle, threads * slices};
  run_range(job, task_id, 1, &env);
  for (int k = 1; k < threads; k++) run_range(job, (task_id + k) % threads, 0, &env);
  job->finished[task_id] = now();
  job->threads = threads;
  return 0;
}

static void record(const Job* job) {
  if (job->threads < 2) return;
  double first = job->finished[0], last = job->finished[0];
  int slowest = 0;
  for (int t = 0; t < job->threads; t++) {
    busy_seconds[t] += job->finished[t] - job->began[t];
    start_lag_seconds[t] += job->began[t] - job->launched;
    if (job->finished[t] < first) first = job->finished[t];
    if (job->finished[t] > last) { last = job->finished[t]; slowest = t; }
  }
  spread_seconds += last - first;
  launch_seconds += last - job->launched;
  last_to_finish[slowest]++;
  launches++;
  stats_threads = job->threads;
}

static int balanced_launch(ParallelLambda kernel, void* cdata, int num_task) {
  Job job;
  memset(&job, 0, sizeof job);
  job.kernel = kernel;
  job.cdata = cdata;
  job.launched = now();
  int rc = tvm_launch(worker, &job, num_task);
  record(&job);
  return rc ? rc : atomic_load(&job.error);
}

/* Route the library's parallel launches (`slot` is its __TVMBackendParallelLaunch) through
 * balanced_launch with `tasks_per_thread` slices; 0 gives TVM's own launch back. */
void tvmnet_install(void** slot, int tasks_per_thread) {
  if (*slot != (void*)balanced_launch) tvm_launch = (ParallelLaunch)*slot;
  if (tasks_per_thread <= 0) {
    *slot = (void*)tvm_launch;
    return;
  }
  slices = tasks_per_thread;
  *slot = (void*)balanced_launch;
}

/* Per launch, summed since the last call, then reset: out[0] launches, out[1] threads, out[2] seconds from
 * launch to the last thread's end, out[3] from the first thread's end to the last's; then per thread t:
 * out[4 + 3t] seconds busy, out[5 + 3t] seconds from launch to its start, out[6 + 3t] launches it ended last. */
void tvmnet_stats(double* out) {
  out[0] = (double)launches;
  out[1] = stats_threads;
  out[2] = launch_seconds;
  out[3] = spread_seconds;
  for (int t = 0; t < stats_threads; t++) {
    out[4 + 3 * t] = busy_seconds[t];
    out[5 + 3 * t] = start_lag_seconds[t];
    out[6 + 3 * t] = (double)last_to_finish[t];
  }
  memset(busy_seconds, 0, sizeof busy_seconds);
  memset(start_lag_seconds, 0, sizeof start_lag_seconds);
  memset(last_to_finish, 0, sizeof last_to_finish);
  spread_seconds = launch_seconds = 0;
  launches = 0;
}
