/*
 * file-ops: the two Linux file calls Node does not expose, for snapstack's
 * src/io/native-file-ops.ts.
 *
 *   fallocate(fd, mode, offset, length) -> 0 or -errno
 *     punch holes (return space, read back zeroes), zero ranges and
 *     preallocate (qemu's file-posix does the same three);
 *   seek(fd, offset, whence) -> new offset or -errno
 *     lseek with SEEK_DATA / SEEK_HOLE, to find a file's holes.
 *
 * Both are synchronous and return errors as numbers: the TypeScript side
 * turns them into coded errors and falls back (writing zeroes, reporting
 * all data) where a file system does not support a call. Offsets travel as
 * doubles: exact up to 2^53, far beyond any file. N-API only (ABI-stable),
 * so one build serves every Node >= 22.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
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

static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  double v[4];
  if (!read_args(env, info, 4, v)) return NULL;
  int rc;
  do rc = fallocate((int)v[0], (int)v[1], (off_t)v[2], (off_t)v[3]);
  while (rc < 0 && errno == EINTR);
  return number(env, rc < 0 ? -errno : 0);
}

static napi_value js_seek(napi_env env, napi_callback_info info) {
  double v[3];
  if (!read_args(env, info, 3, v)) return NULL;
  off_t at = lseek((int)v[0], (off_t)v[1], (int)v[2]);
  return number(env, at < 0 ? -errno : (double)at);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor methods[] = {
      {"fallocate", NULL, js_fallocate, NULL, NULL, NULL, napi_default, NULL},
      {"seek", NULL, js_seek, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof methods / sizeof methods[0], methods);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
