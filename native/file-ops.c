/*
 * file-ops: the Linux file calls Node does not expose, for snapstack's
 * src/io/native-file-ops.ts.
 *
 *   fallocate(fd, mode, offset, length) -> Promise<0 or -errno>
 *     punch holes (return space, read back zeroes), zero ranges and
 *     preallocate (qemu's file-posix does the same three), on libuv's
 *     thread pool as qemu runs them on its own: a punch over a large
 *     dirty range takes tens of milliseconds (the file system writes the
 *     pages back or drops them first), which would stall every client of
 *     a server if it ran on the event loop;
 *   fallocateSync(fd, mode, offset, length) -> 0 or -errno
 *     the same on the calling thread, for the allocation just before a
 *     synchronous write (microseconds);
 *   seek(fd, offset, whence) -> new offset or -errno
 *     lseek with SEEK_DATA / SEEK_HOLE, to find a file's holes
 *     (synchronous: it reads extent metadata only);
 *   writeAllocating(fd, offset, buffers) -> Promise<bytes written or -errno>
 *     fallocate(FALLOC_FL_KEEP_SIZE) over the range, then one pwritev, as
 *     one thread-pool job: a large write into a hole then finds its blocks
 *     allocated instead of reserving them page by page (ext4 delayed
 *     allocation), ~20% less kernel time per byte; over allocated blocks
 *     the fallocate changes nothing. Its failure is ignored: the write
 *     decides the result.
 *   cached(fd, offset, length) -> 1 when the page cache holds every page of
 *     the range, 0 when not, or -errno
 *     cachestat(2) (Linux 6.5; -ENOSYS before): a metadata table that is
 *     wholly cached is read in one call; otherwise only its data is read,
 *     skipping the file's holes (src/io/file.ts, readSkippingHoles). A
 *     non-blocking read cannot tell: RWF_NOWAIT still reads ahead, and a
 *     hole "read ahead" is zeroed pages allocated;
 *   byteLock(fd, byte, mode) -> 0, 1 (mode 2 only: held elsewhere) or -errno
 *     QEMU's image locks (block/file-posix.c): open file description
 *     (OFD) locks on single bytes. mode 0 drops this description's lock
 *     on the byte, 1 takes a shared one (F_RDLCK, what QEMU takes), 2
 *     only tests whether another description holds one (F_OFD_GETLK for
 *     an exclusive lock, as qemu_lock_fd_test): 1 when it does.
 *
 * All return errors as numbers: the TypeScript side turns them into coded
 * errors and falls back (writing zeroes, reporting all data) where a file
 * system does not support a call. Offsets travel as doubles: exact up to
 * 2^53, far beyond any file. N-API only (ABI-stable), so one build serves
 * every Node >= 22.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <node_api.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static int read_args(napi_env env, napi_callback_info info, size_t count, double *values) {
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != count) {
    napi_throw_type_error(env, NULL, "file-ops: wrong number of arguments");
    return 0;
  }
  for (size_t i = 0; i < count; i++) {
    if (napi_get_value_double(env, argv[i], &values[i]) != napi_ok || values[i] < 0 || values[i] > 9007199254740991.0) {
      napi_throw_type_error(env, NULL, "file-ops: arguments are non-negative safe integers");
      return 0;
    }
  }
  return 1;
}

static napi_value number(napi_env env, double value) {
  napi_value result;
  napi_create_double(env, value, &result);
  return result;
}

static napi_value js_seek(napi_env env, napi_callback_info info) {
  double v[3];
  if (!read_args(env, info, 3, v)) return NULL;
  off_t at = lseek((int)v[0], (off_t)v[1], (int)v[2]);
  return number(env, at < 0 ? -errno : (double)at);
}

#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif

struct cachestat_range_arg {
  uint64_t off;
  uint64_t len;
};

struct cachestat_result {
  uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

static napi_value js_cached(napi_env env, napi_callback_info info) {
  double v[3];
  if (!read_args(env, info, 3, v)) return NULL;
  static uint64_t page = 0;
  if (page == 0) page = (uint64_t)sysconf(_SC_PAGESIZE);
  uint64_t first = (uint64_t)v[1] / page, end = ((uint64_t)v[1] + (uint64_t)v[2] + page - 1) / page;
  struct cachestat_range_arg range = {.off = first * page, .len = (end - first) * page};
  struct cachestat_result stat;
  if (syscall(__NR_cachestat, (int)v[0], &range, &stat, 0) < 0) return number(env, -errno);
  return number(env, stat.nr_cache >= end - first ? 1 : 0);
}

/*
 * One thread-pool job: `run` executes on a pool thread and sets `result`;
 * the promise resolves with it. For a write, the iovecs point into buffers
 * that `keep` holds alive until the job completes.
 */
typedef struct job {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref keep;
  void (*run)(struct job *job);
  int fd;
  int mode;
  off_t offset;
  off_t length;
  int count;
  double result;
  struct iovec iov[];
} job;

static void job_execute(napi_env env, void *data) {
  (void)env;
  job *j = data;
  j->run(j);
}

static void job_complete(napi_env env, napi_status status, void *data) {
  job *j = data;
  napi_resolve_deferred(env, j->deferred, number(env, status == napi_ok ? j->result : -ECANCELED));
  if (j->keep != NULL) napi_delete_reference(env, j->keep);
  napi_delete_async_work(env, j->work);
  free(j);
}

/* Queue `j` (its fields set) and return its promise. */
static napi_value job_queue(napi_env env, job *j, const char *name) {
  napi_value promise, resource_name;
  napi_create_promise(env, &j->deferred, &promise);
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource_name);
  napi_create_async_work(env, NULL, resource_name, job_execute, job_complete, j, &j->work);
  napi_queue_async_work(env, j->work);
  return promise;
}

static int fallocate_retrying(int fd, int mode, off_t offset, off_t length) {
  int rc;
  do rc = fallocate(fd, mode, offset, length);
  while (rc < 0 && errno == EINTR);
  return rc < 0 ? -errno : 0;
}

static void run_fallocate(job *j) {
  j->result = fallocate_retrying(j->fd, j->mode, j->offset, j->length);
}

static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  double v[4];
  if (!read_args(env, info, 4, v)) return NULL;
  job *j = calloc(1, sizeof(job));
  if (j == NULL) {
    napi_throw_error(env, NULL, "file-ops: out of memory");
    return NULL;
  }
  j->run = run_fallocate;
  j->fd = (int)v[0];
  j->mode = (int)v[1];
  j->offset = (off_t)v[2];
  j->length = (off_t)v[3];
  return job_queue(env, j, "snapstack:fallocate");
}

static napi_value js_fallocate_sync(napi_env env, napi_callback_info info) {
  double v[4];
  if (!read_args(env, info, 4, v)) return NULL;
  return number(env, fallocate_retrying((int)v[0], (int)v[1], (off_t)v[2], (off_t)v[3]));
}

static void run_write_allocating(job *j) {
  (void)fallocate(j->fd, FALLOC_FL_KEEP_SIZE, j->offset, j->length);
  ssize_t written;
  do written = pwritev(j->fd, j->iov, j->count, j->offset);
  while (written < 0 && errno == EINTR);
  j->result = written < 0 ? -errno : (double)written;
}

static napi_value js_write_allocating(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  double fd, offset;
  uint32_t count = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc != 3 || napi_get_value_double(env, argv[0], &fd) != napi_ok ||
      napi_get_value_double(env, argv[1], &offset) != napi_ok || offset < 0 || offset > 9007199254740991.0 ||
      napi_get_array_length(env, argv[2], &count) != napi_ok || count == 0 || count > IOV_MAX) {
    napi_throw_type_error(env, NULL, "file-ops: writeAllocating(fd, offset, buffers: 1 to IOV_MAX Uint8Arrays)");
    return NULL;
  }
  job *j = calloc(1, sizeof(job) + count * sizeof(struct iovec));
  if (j == NULL) {
    napi_throw_error(env, NULL, "file-ops: out of memory");
    return NULL;
  }
  j->run = run_write_allocating;
  j->fd = (int)fd;
  j->offset = (off_t)offset;
  j->count = (int)count;
  for (uint32_t i = 0; i < count; i++) {
    napi_value element;
    napi_typedarray_type type;
    size_t length;
    void *bytes;
    if (napi_get_element(env, argv[2], i, &element) != napi_ok ||
        napi_get_typedarray_info(env, element, &type, &length, &bytes, NULL, NULL) != napi_ok || type != napi_uint8_array) {
      free(j);
      napi_throw_type_error(env, NULL, "file-ops: writeAllocating's buffers are Uint8Arrays");
      return NULL;
    }
    j->iov[i].iov_base = bytes;
    j->iov[i].iov_len = length;
    j->length += (off_t)length;
  }
  napi_create_reference(env, argv[2], 1, &j->keep);
  return job_queue(env, j, "snapstack:writeAllocating");
}

static napi_value js_byte_lock(napi_env env, napi_callback_info info) {
  double v[3];
  if (!read_args(env, info, 3, v)) return NULL;
  int mode = (int)v[2];
  struct flock lock = {.l_whence = SEEK_SET, .l_start = (off_t)v[1], .l_len = 1, .l_pid = 0};
  lock.l_type = mode == 0 ? F_UNLCK : mode == 1 ? F_RDLCK : F_WRLCK;
  if (fcntl((int)v[0], mode == 2 ? F_OFD_GETLK : F_OFD_SETLK, &lock) < 0) return number(env, -errno);
  return number(env, mode == 2 && lock.l_type != F_UNLCK ? 1 : 0);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor methods[] = {
      {"fallocate", NULL, js_fallocate, NULL, NULL, NULL, napi_default, NULL},
      {"fallocateSync", NULL, js_fallocate_sync, NULL, NULL, NULL, napi_default, NULL},
      {"seek", NULL, js_seek, NULL, NULL, NULL, napi_default, NULL},
      {"byteLock", NULL, js_byte_lock, NULL, NULL, NULL, napi_default, NULL},
      {"cached", NULL, js_cached, NULL, NULL, NULL, napi_default, NULL},
      {"writeAllocating", NULL, js_write_allocating, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof methods / sizeof methods[0], methods);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
