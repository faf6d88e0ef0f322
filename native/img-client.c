/*
 * snapstack-img: `snapstack img ARGS` without Node's start-up. It sends the
 * command line to a resident `snapstack helper` on a Unix socket and relays
 * what the command prints and its exit status; with no helper listening, it
 * runs bin/snapstack img ARGS itself (execv), so it always works.
 *
 * Design notes (the protocol: src/cli/helper/helper-protocol.ts)
 * - Socket: $SNAPSTACK_HELPER_SOCKET, else $TMPDIR/snapstack-UID/img-helper.sock
 *   (TMPDIR unset: /tmp), used only if that directory is a directory (not
 *   a link), this user's and not writable by others (someone else could
 *   have put a socket there), the check the helper makes when it creates
 *   it (src/io/user-socket-dir.ts). SNAPSTACK_HELPER=off
 *   never uses a helper.
 * - The request carries the umask, the working directory, the arguments
 *   and the whole environment: the command sees what it would see here.
 * - Frames back: REFUSED or a connection that closes before STARTED means
 *   nothing ran, and the command runs here instead; after STARTED it never
 *   runs twice, and a connection that ends without EXIT is reported as
 *   E_ABORTED (exit 1; 2 for `compare`, as docs/errors.md has it).
 * - The listener must be this user's process (SO_PEERCRED): the request
 *   carries the whole environment.
 * - Signals: once the command runs (STARTED read), SIGINT, SIGTERM, SIGHUP
 *   and SIGQUIT send the helper SIGKILL (its pid from SO_PEERCRED), then
 *   end this process by the same signal: the command ends as the signal
 *   would have ended its own process, and our parent sees the signal.
 *   Before that they end this process only; the helper notices the closed
 *   connection when it next turns to it (a command it had just started may
 *   run to its end). SIGTSTP (Ctrl-Z) stops this process, not the command.
 * - Output to a reader that went away (`| head -1`): SIGPIPE is ignored and
 *   the rest of that stream's output is dropped, the command runs to its end
 *   and its status is the exit status, as `snapstack img` and qemu-img do.
 * - Built by native/build.mjs with SNAPSTACK_BIN, the absolute path of
 *   bin/snapstack.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef SNAPSTACK_BIN
#error "build with -DSNAPSTACK_BIN='\"/path/to/bin/snapstack\"'"
#endif

#define PROTOCOL "snapstack-helper/1"
#define FRAME_REFUSED 'R'
#define FRAME_STARTED 'S'
#define FRAME_STDOUT 'O'
#define FRAME_STDERR 'E'
#define FRAME_EXIT 'X'
/* Largest frame payload the helper sends (FRAME_PAYLOAD_BYTES_MAX). */
#define FRAME_PAYLOAD_MAX (1024 * 1024)

extern char **environ;

/* The exit status of an error this client reports itself: 1, but 2 for `compare` (where 1 means
   "the images differ"), as snapstack img's exit-code table has it (docs/errors.md). */
static int error_status = 1;

/* The helper running our command (from STARTED), for the signal handler. */
static volatile sig_atomic_t helper_pid = 0;

static void forward_signal(int signal_number) {
  if (helper_pid > 0) kill((pid_t)helper_pid, SIGKILL);
  signal(signal_number, SIG_DFL);
  raise(signal_number);
}

/* Install `handler` (forward_signal while the command runs, SIG_DFL after) for the signals that end a command. */
static void set_forwarding(void (*handler)(int)) {
  struct sigaction action = {.sa_handler = handler};
  sigemptyset(&action.sa_mask);
  const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
  for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++) sigaction(forwarded[i], &action, NULL);
}

/* Run `bin/snapstack img ARGS` in this process instead; with SNAPSTACK_DEBUG=1, say why on stderr. */
static void run_directly(int argc, char **argv, const char *reason) {
  const char *debug = getenv("SNAPSTACK_DEBUG");
  if (debug != NULL && strcmp(debug, "1") == 0) fprintf(stderr, "snapstack-img: running the command without a helper: %s\n", reason);
  char **args = calloc((size_t)argc + 2, sizeof(char *));
  if (args == NULL) {
    fputs("snapstack-img: error E_INTERNAL: out of memory\n", stderr);
    exit(1);
  }
  signal(SIGPIPE, SIG_DFL); /* ignored below; an exec'd program inherits that */
  args[0] = SNAPSTACK_BIN;
  args[1] = "img";
  for (int i = 1; i < argc; i++) args[i + 1] = argv[i];
  execv(SNAPSTACK_BIN, args);
  fprintf(stderr, "snapstack-img: error E_NOT_FOUND: cannot run %s: %s\n", SNAPSTACK_BIN, strerror(errno));
  exit(error_status);
}

/* The helper's socket path into `out`; 0, or -1 when there is none to use. */
static int socket_path(char *out, size_t size) {
  const char *chosen = getenv("SNAPSTACK_HELPER_SOCKET");
  if (chosen != NULL && chosen[0] != '\0') {
    if (strlen(chosen) >= size) return -1;
    strcpy(out, chosen);
    return 0;
  }
  const char *tmp = getenv("TMPDIR");
  if (tmp == NULL || tmp[0] == '\0') tmp = "/tmp";
  char dir[PATH_MAX];
  int n = snprintf(dir, sizeof dir, "%s/snapstack-%u", tmp, (unsigned)getuid());
  if (n < 0 || (size_t)n >= sizeof dir) return -1;
  struct stat st;
  if (lstat(dir, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid() || (st.st_mode & 022) != 0) return -1;
  n = snprintf(out, size, "%s/img-helper.sock", dir);
  return n < 0 || (size_t)n >= size ? -1 : 0;
}

typedef struct {
  char *bytes;
  size_t length;
  size_t capacity;
} buffer;

static int append(buffer *b, const char *text) {
  size_t n = strlen(text) + 1; /* with its NUL */
  if (b->length + n > b->capacity) {
    size_t capacity = b->capacity * 2 + n + 4096;
    char *grown = realloc(b->bytes, capacity);
    if (grown == NULL) return -1;
    b->bytes = grown;
    b->capacity = capacity;
  }
  memcpy(b->bytes + b->length, text, n);
  b->length += n;
  return 0;
}

static int append_number(buffer *b, unsigned long value) {
  char text[32];
  snprintf(text, sizeof text, "%lu", value);
  return append(b, text);
}

static int write_all(int fd, const char *bytes, size_t length) {
  while (length > 0) {
    ssize_t n = write(fd, bytes, length);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return -1;
    bytes += n;
    length -= (size_t)n;
  }
  return 0;
}

/* Read exactly `length` bytes; 0, or -1 at end of stream or on an error. */
static int read_all(int fd, char *bytes, size_t length) {
  while (length > 0) {
    ssize_t n = read(fd, bytes, length);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return -1;
    bytes += n;
    length -= (size_t)n;
  }
  return 0;
}

/* The request (see the protocol) with its length prefix at the start of `b`; 0, or -1. */
static int build_request(buffer *b, int argc, char **argv) {
  buffer body = {NULL, 0, 0};
  char cwd[PATH_MAX];
  if (getcwd(cwd, sizeof cwd) == NULL) return -1;
  mode_t mask = umask(0);
  umask(mask);
  if (append(&body, PROTOCOL) || append_number(&body, (unsigned long)mask) || append(&body, cwd) || append_number(&body, (unsigned long)argc) ||
      append(&body, "img"))
    return -1;
  for (int i = 1; i < argc; i++)
    if (append(&body, argv[i])) return -1;
  unsigned long count = 0;
  for (char **entry = environ; *entry != NULL; entry++) count++;
  if (append_number(&body, count)) return -1;
  for (char **entry = environ; *entry != NULL; entry++)
    if (append(&body, *entry)) return -1;
  if (body.length > UINT32_MAX) return -1;
  b->bytes = malloc(body.length + 4);
  if (b->bytes == NULL) return -1;
  uint32_t length = (uint32_t)body.length;
  for (int i = 0; i < 4; i++) b->bytes[i] = (char)((length >> (8 * i)) & 0xff);
  memcpy(b->bytes + 4, body.bytes, body.length);
  b->length = body.length + 4;
  free(body.bytes);
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "compare") == 0) error_status = 2;
  const char *mode = getenv("SNAPSTACK_HELPER");
  if (mode != NULL && strcmp(mode, "off") == 0) run_directly(argc, argv, "SNAPSTACK_HELPER=off");

  struct sockaddr_un address = {.sun_family = AF_UNIX};
  if (socket_path(address.sun_path, sizeof address.sun_path) != 0) run_directly(argc, argv, "no private socket directory");
  /* From here a helper that goes away mid-write is a failed write (the command then runs here), not a SIGPIPE death. */
  signal(SIGPIPE, SIG_IGN);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&address, sizeof address) != 0) run_directly(argc, argv, "no helper listens on the socket");
  /* The helper must be this user's (the environment goes to it), and its pid is what a signal kills. */
  struct ucred peer;
  socklen_t peer_size = sizeof peer;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &peer_size) != 0 || peer.uid != getuid() || peer.pid <= 0) {
    close(fd);
    run_directly(argc, argv, "the socket's listener is not this user's process");
  }

  buffer request;
  if (build_request(&request, argc, argv) != 0 || write_all(fd, request.bytes, request.length) != 0) {
    close(fd);
    run_directly(argc, argv, "the request could not be sent");
  }
  free(request.bytes);

  int started = 0;
  int open_streams[3] = {0, 1, 1}; /* stdout, stderr still take output */
  static char payload[64 * 1024];
  for (;;) {
    unsigned char header[5];
    if (read_all(fd, (char *)header, sizeof header) != 0) break;
    uint32_t length = (uint32_t)header[1] | (uint32_t)header[2] << 8 | (uint32_t)header[3] << 16 | (uint32_t)header[4] << 24;
    if (length > FRAME_PAYLOAD_MAX) break;
    char kind = (char)header[0];
    if (kind == FRAME_REFUSED && !started) {
      size_t shown = length < sizeof payload - 1 ? length : sizeof payload - 1;
      if (read_all(fd, payload, shown) != 0) shown = 0;
      payload[shown] = '\0';
      close(fd);
      run_directly(argc, argv, payload);
    }
    if (kind == FRAME_STARTED && !started) {
      /* Never run twice from here, whatever follows. The pid to signal is the peer's, from the
         kernel (SO_PEERCRED, in this pid namespace), not the payload's. */
      started = 1;
      helper_pid = peer.pid;
      set_forwarding(forward_signal);
    }
    if (kind == FRAME_EXIT) {
      char text[16];
      if (length >= sizeof text || read_all(fd, text, length) != 0) break;
      text[length] = '\0';
      set_forwarding(SIG_DFL);
      return atoi(text);
    }
    int target = kind == FRAME_STDOUT ? 1 : kind == FRAME_STDERR ? 2 : -1;
    while (length > 0) {
      size_t piece = length < sizeof payload ? length : sizeof payload;
      if (read_all(fd, payload, piece) != 0) goto lost;
      if (target > 0 && open_streams[target] && write_all(target, payload, piece) != 0) open_streams[target] = 0;
      length -= (uint32_t)piece;
    }
  }
lost:
  set_forwarding(SIG_DFL);
  if (!started) {
    /* The helper went away before the command began (it was stopping): run it here. */
    close(fd);
    run_directly(argc, argv, "the helper closed the connection before the command started");
  }
  fputs("snapstack-img: error E_ABORTED: the snapstack helper ended before the command finished\n", stderr);
  return error_status;
}
