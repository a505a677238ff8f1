/*
 * loadgen: low-overhead load generator for unary gRPC calls over h2c.
 *
 * Why C on libnghttp2: on a small machine a Python client would compete
 * with the server under test for CPU.  This is one thread, one epoll loop,
 * batched writes, no protobuf: bodies are pre-serialized and answers are
 * checked by searching the response message for an expected byte string.
 *
 * Record files (--requests, --expected): repeated [u32 little-endian len][bytes].
 * Request i uses body i mod N; its answer must contain expected[i mod N].
 *
 * Closed loop (default): --concurrency calls kept outstanding, new calls go
 * round-robin over --connections.  Open loop (--rate R): Poisson arrivals at
 * R/s; latency counts from the *scheduled* send time (no coordinated omission).
 *
 * A call is measured iff its start (closed) or scheduled time (open) falls in
 * [warmup, warmup+duration).  After that window no new calls start and the
 * measured ones still in flight get --drain seconds to finish ("unfinished"
 * otherwise).  A lost connection fails its calls as "transport" errors and is
 * reconnected after 100 ms.  Prints one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

#define NS 1000000000ull
#define OUTBUF_GATHER (64 * 1024) /* batch nghttp2 output into one write() */
#define RETRY_NS (100 * 1000000ull)

typedef struct { uint8_t *p; size_t n; } rec_t;
typedef struct conn conn_t;

typedef struct call {
  struct call *prev, *next; /* in-flight list of its connection */
  conn_t *conn;
  uint32_t idx;             /* record index */
  uint64_t t0;              /* start (closed) or scheduled (open) time, ns */
  int measured, grpc_status;
  size_t sent;              /* request bytes handed to nghttp2 */
  uint8_t *buf;             /* response body (gRPC framed) */
  size_t len, cap;
} call_t;

struct conn {
  int fd, state;            /* 0 down, 1 connecting, 2 up */
  nghttp2_session *s;
  call_t head;              /* sentinel of in-flight list */
  uint8_t *out;
  size_t olen, ooff, ocap;
  int pollout;
  uint64_t retry_at;
};

enum { E_TRANSPORT = 17, E_NO_STATUS, E_NO_CONN, E_OTHER, E_N };
static const char *ekey[E_N] = {[E_TRANSPORT] = "transport", [E_NO_STATUS] = "no_status",
                                [E_NO_CONN] = "no_connection", [E_OTHER] = "other"};

static struct {
  /* config */
  const char *host, *port, *path;
  char authority[300];
  int conc, nconn;
  double rate, duration, warmup, drain;
  uint64_t seed, max_out;
  /* data */
  rec_t *bodies, *expect;
  size_t nrec;
  /* runtime */
  struct sockaddr_storage addr;
  socklen_t addrlen;
  int ep;
  conn_t *conns;
  int rr;
  uint64_t seq, inflight, minflight, next_arrival, rng;
  uint64_t warm_end, end, drain_end;
  call_t *freelist;
  nghttp2_session_callbacks *cbs;
  nghttp2_nv nv[6];
  /* stats (measured calls only) */
  uint64_t sent, answered, ok, mismatch, dropped, reconnects, errs[E_N];
  uint64_t *lat;
  size_t nlat, caplat;
} G;

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * NS + ts.tv_nsec;
}

static void die(const char *m) { fprintf(stderr, "loadgen: %s\n", m); exit(2); }

static void *xrealloc(void *p, size_t n) {
  p = realloc(p, n ? n : 1);
  if (!p) die("out of memory");
  return p;
}

static rec_t *load_records(const char *file, size_t *n) {
  FILE *f = fopen(file, "rb");
  if (!f) { perror(file); exit(2); }
  rec_t *r = NULL;
  size_t cnt = 0;
  uint8_t h[4];
  while (fread(h, 1, 4, f) == 4) {
    size_t len = h[0] | h[1] << 8 | h[2] << 16 | (size_t)h[3] << 24;
    r = xrealloc(r, (cnt + 1) * sizeof *r);
    r[cnt].p = xrealloc(NULL, len);
    r[cnt].n = len;
    if (fread(r[cnt].p, 1, len, f) != len) die("truncated record file");
    cnt++;
  }
  fclose(f);
  *n = cnt;
  return r;
}

/* ---- call bookkeeping ---- */

static call_t *call_new(void) {
  call_t *c = G.freelist; /* pooled: keeps response buffers, avoids malloc per call */
  if (c) G.freelist = c->next;
  else c = calloc(1, sizeof *c);
  if (!c) die("out of memory");
  c->len = c->sent = 0;
  c->grpc_status = -1;
  return c;
}

static void lat_push(uint64_t v) {
  if (G.nlat == G.caplat) {
    G.caplat = G.caplat ? G.caplat * 2 : 1 << 16;
    G.lat = xrealloc(G.lat, G.caplat * sizeof *G.lat);
  }
  G.lat[G.nlat++] = v;
}

/* Completes a call: classify, record, recycle.  lost = its connection died. */
static void call_finish(call_t *c, int lost) {
  c->prev->next = c->next;
  c->next->prev = c->prev;
  G.inflight--;
  if (c->measured) {
    G.minflight--;
    if (lost) {
      G.errs[E_TRANSPORT]++;
    } else if (c->grpc_status >= 0) {
      G.answered++;
      lat_push(now_ns() - c->t0);
      if (c->grpc_status == 0) {
        rec_t *e = &G.expect[c->idx];
        if (c->len >= 5 && memmem(c->buf + 5, c->len - 5, e->p, e->n)) G.ok++;
        else G.mismatch++;
      } else {
        G.errs[c->grpc_status < 17 ? c->grpc_status : E_OTHER]++;
      }
    } else { /* e.g. RST_STREAM or non-gRPC HTTP error without grpc-status */
      G.errs[E_NO_STATUS]++;
    }
  }
  c->next = G.freelist;
  G.freelist = c;
}

/* ---- nghttp2 callbacks ---- */

static ssize_t body_read(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t len,
                         uint32_t *flags, nghttp2_data_source *src, void *ud) {
  (void)s; (void)sid; (void)ud;
  call_t *c = src->ptr;
  rec_t *b = &G.bodies[c->idx];
  size_t n = b->n - c->sent;
  if (n > len) n = len;
  memcpy(buf, b->p + c->sent, n);
  c->sent += n;
  if (c->sent == b->n) *flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)n;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                     size_t nlen, const uint8_t *val, size_t vlen, uint8_t fl, void *ud) {
  (void)fl; (void)ud; (void)vlen;
  if (f->hd.type != NGHTTP2_HEADERS) return 0;
  call_t *c = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
  if (!c) return 0;
  /* values are NUL-terminated by nghttp2, so atoi is safe */
  if (nlen == 11 && !memcmp(name, "grpc-status", 11)) c->grpc_status = atoi((const char *)val);
  return 0;
}

static int on_data(nghttp2_session *s, uint8_t fl, int32_t sid, const uint8_t *d,
                   size_t n, void *ud) {
  (void)fl; (void)ud;
  call_t *c = nghttp2_session_get_stream_user_data(s, sid);
  if (!c) return 0;
  if (c->len + n > c->cap) {
    c->cap = (c->len + n) * 2;
    c->buf = xrealloc(c->buf, c->cap);
  }
  memcpy(c->buf + c->len, d, n);
  c->len += n;
  return 0;
}

static int on_close(nghttp2_session *s, int32_t sid, uint32_t err, void *ud) {
  (void)err; (void)ud;
  call_t *c = nghttp2_session_get_stream_user_data(s, sid);
  if (c) call_finish(c, 0);
  return 0;
}

/* ---- connections ---- */

static void ep_set(conn_t *c, int op, uint32_t ev) {
  struct epoll_event e = {.events = ev, .data.ptr = c};
  if (epoll_ctl(G.ep, op, c->fd, &e) < 0) die("epoll_ctl");
}

/* retry: delay before reconnecting (0 after a clean GOAWAY close). */
static void conn_down_after(conn_t *c, uint64_t retry) {
  if (c->s) nghttp2_session_del(c->s); /* does not run callbacks */
  c->s = NULL;
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  c->state = 0;
  c->olen = c->ooff = 0;
  c->pollout = 0;
  c->retry_at = now_ns() + retry;
  while (c->head.next != &c->head) call_finish(c->head.next, 1);
}

static void conn_down(conn_t *c) { conn_down_after(c, RETRY_NS); }

static void conn_start(conn_t *c) {
  G.reconnects += c->retry_at != 0;
  c->fd = socket(G.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) die("socket");
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(c->fd, (struct sockaddr *)&G.addr, G.addrlen) < 0 && errno != EINPROGRESS) {
    conn_down(c);
    return;
  }
  c->state = 1;
  c->pollout = 1;
  ep_set(c, EPOLL_CTL_ADD, EPOLLOUT);
}

static void conn_up(conn_t *c) {
  int err = 0;
  socklen_t l = sizeof err;
  getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
  if (err) { conn_down(c); return; }
  nghttp2_session_client_new(&c->s, G.cbs, c);
  /* large windows so big tensors are not throttled by flow control */
  nghttp2_settings_entry st[] = {{NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
                                 {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 24}};
  nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, st, 2);
  nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, 1 << 30);
  c->state = 2;
  c->pollout = 1; /* conn_flush drops EPOLLOUT once nothing is pending */
  ep_set(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
}

/* Serialize pending frames into one buffer and write it; EPOLLOUT only while blocked. */
static void conn_flush(conn_t *c) {
  for (;;) {
    while (c->olen < OUTBUF_GATHER) {
      const uint8_t *d;
      ssize_t n = nghttp2_session_mem_send(c->s, &d);
      if (n < 0) { conn_down(c); return; }
      if (n == 0) break;
      if (c->olen + n > c->ocap) {
        c->ocap = (c->olen + n) * 2;
        c->out = xrealloc(c->out, c->ocap);
      }
      memcpy(c->out + c->olen, d, n);
      c->olen += n;
    }
    if (c->ooff == c->olen) break;
    ssize_t w = send(c->fd, c->out + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      conn_down(c);
      return;
    }
    c->ooff += w;
    if (c->ooff < c->olen) break;
    c->ooff = c->olen = 0;
  }
  int need = c->ooff < c->olen;
  if (need != c->pollout) {
    c->pollout = need;
    ep_set(c, EPOLL_CTL_MOD, EPOLLIN | (need ? EPOLLOUT : 0));
  }
  /* e.g. after GOAWAY once its streams are done: reconnect */
  if (!need && !nghttp2_session_want_read(c->s) && !nghttp2_session_want_write(c->s))
    conn_down_after(c, 0);
}

static void conn_read(conn_t *c) {
  static uint8_t buf[256 * 1024];
  for (;;) {
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0 || nghttp2_session_mem_recv(c->s, buf, n) < 0) { conn_down(c); return; }
    if ((size_t)n < sizeof buf) return;
  }
}

static conn_t *pick_conn(void) {
  for (int i = 0; i < G.nconn; i++) {
    conn_t *c = &G.conns[(G.rr + i) % G.nconn];
    if (c->state == 2 && nghttp2_session_check_request_allowed(c->s)) {
      G.rr = (G.rr + i + 1) % G.nconn;
      return c;
    }
  }
  return NULL;
}

/* ---- issuing calls ---- */

static void submit(conn_t *cn, uint64_t t0) {
  int measured = t0 >= G.warm_end && t0 < G.end;
  call_t *c = call_new();
  c->idx = G.seq++ % G.nrec;
  c->t0 = t0;
  c->measured = measured;
  c->conn = cn;
  nghttp2_data_provider prd = {.source.ptr = c, .read_callback = body_read};
  if (nghttp2_submit_request(cn->s, NULL, G.nv, 6, &prd, c) < 0) die("submit_request");
  c->prev = &cn->head;
  c->next = cn->head.next;
  cn->head.next->prev = c;
  cn->head.next = c;
  G.inflight++;
  if (measured) G.sent++, G.minflight++;
}

static double exp_interval_ns(void) {
  G.rng ^= G.rng >> 12, G.rng ^= G.rng << 25, G.rng ^= G.rng >> 27; /* xorshift64* */
  double u = ((G.rng * 0x2545F4914F6CDD1Dull >> 11) + 1) * 0x1.0p-53;  /* (0,1] */
  return -log(u) / G.rate * 1e9;
}

static void pump(uint64_t now) {
  conn_t *cn;
  if (G.rate <= 0) {
    while (now < G.end && G.inflight < (uint64_t)G.conc && (cn = pick_conn())) submit(cn, now);
    return;
  }
  while (G.next_arrival <= now && G.next_arrival < G.end) {
    uint64_t t = G.next_arrival;
    int measured = t >= G.warm_end;
    G.next_arrival += (uint64_t)exp_interval_ns();
    if (G.inflight >= G.max_out) { /* client-side overload: arrival is not sent */
      if (measured) G.sent++, G.dropped++;
    } else if (!(cn = pick_conn())) { /* no live connection: arrival fails at once */
      if (measured) G.sent++, G.errs[E_NO_CONN]++;
    } else {
      submit(cn, t);
    }
  }
}

/* ---- output ---- */

/* epoll_pwait2 gives ns-precise wakeups for open-loop arrivals without a timerfd
 * (which would cost two extra syscalls per arrival); epoll_wait (ms, rounded up)
 * is the fallback on kernels older than 5.11. */
static int wait_until(struct epoll_event *evs, int max, uint64_t deadline) {
  static int no_pwait2;
  uint64_t now = now_ns(), d = deadline > now ? deadline - now : 0;
  if (!no_pwait2) {
    struct timespec ts = {d / NS, d % NS};
    int n = epoll_pwait2(G.ep, evs, max, &ts, NULL);
    if (n >= 0 || errno != ENOSYS) return n < 0 ? 0 : n;
    no_pwait2 = 1;
  }
  int n = epoll_wait(G.ep, evs, max, (int)((d + 999999) / 1000000));
  return n < 0 ? 0 : n;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static double pct(double q) {
  if (!G.nlat) return 0;
  size_t i = (size_t)ceil(q * G.nlat);
  return G.lat[i ? i - 1 : 0] / 1e6;
}

static double tv(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

static void usage(void) {
  fprintf(stderr,
          "usage: loadgen --target host:port --method /pkg.Svc/Method --requests F --expected F\n"
          "  [--concurrency 64] [--connections 4] [--duration 5] [--warmup 1]\n"
          "  [--rate R (open loop)] [--max-outstanding 10000] [--drain 2] [--seed 1]\n");
  exit(2);
}

int main(int argc, char **argv) {
  const char *target = NULL, *freq = NULL, *fexp = NULL;
  G.conc = 64, G.nconn = 4, G.duration = 5, G.warmup = 1, G.drain = 2, G.seed = 1;
  G.max_out = 10000;
  static struct option opts[] = {
      {"target", 1, 0, 't'},      {"method", 1, 0, 'm'},   {"requests", 1, 0, 'r'},
      {"expected", 1, 0, 'e'},    {"concurrency", 1, 0, 'c'}, {"connections", 1, 0, 'k'},
      {"duration", 1, 0, 'd'},    {"warmup", 1, 0, 'w'},   {"rate", 1, 0, 'R'},
      {"max-outstanding", 1, 0, 'M'}, {"drain", 1, 0, 'D'}, {"seed", 1, 0, 's'},
      {0, 0, 0, 0}};
  for (int o; (o = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
    switch (o) {
    case 't': target = optarg; break;
    case 'm': G.path = optarg; break;
    case 'r': freq = optarg; break;
    case 'e': fexp = optarg; break;
    case 'c': G.conc = atoi(optarg); break;
    case 'k': G.nconn = atoi(optarg); break;
    case 'd': G.duration = atof(optarg); break;
    case 'w': G.warmup = atof(optarg); break;
    case 'R': G.rate = atof(optarg); break;
    case 'M': G.max_out = strtoull(optarg, NULL, 10); break;
    case 'D': G.drain = atof(optarg); break;
    case 's': G.seed = strtoull(optarg, NULL, 10); break;
    default: usage();
    }
  }
  if (!target || !G.path || !freq || !fexp || G.conc < 1 || G.nconn < 1) usage();

  /* split host:port ([v6]:port allowed) and resolve once */
  static char host[256];
  snprintf(G.authority, sizeof G.authority, "%s", target);
  snprintf(host, sizeof host, "%s", target);
  char *colon = strrchr(host, ':');
  if (!colon) usage();
  *colon = 0;
  G.port = colon + 1;
  G.host = host;
  if (host[0] == '[') G.host = host + 1, host[strlen(host) - 1] = 0;
  struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
  if (getaddrinfo(G.host, G.port, &hints, &ai)) die("cannot resolve target");
  memcpy(&G.addr, ai->ai_addr, ai->ai_addrlen);
  G.addrlen = ai->ai_addrlen;
  freeaddrinfo(ai);

  size_t ne;
  rec_t *msgs = load_records(freq, &G.nrec);
  G.expect = load_records(fexp, &ne);
  if (!G.nrec || ne != G.nrec) die("need N>0 requests and as many expected records");
  G.bodies = xrealloc(NULL, G.nrec * sizeof *G.bodies);
  for (size_t i = 0; i < G.nrec; i++) { /* prepend the gRPC 5-byte message prefix */
    size_t n = msgs[i].n;
    uint8_t *p = G.bodies[i].p = xrealloc(NULL, n + 5);
    G.bodies[i].n = n + 5;
    p[0] = 0, p[1] = n >> 24, p[2] = n >> 16, p[3] = n >> 8, p[4] = n;
    memcpy(p + 5, msgs[i].p, n);
    free(msgs[i].p);
  }
  free(msgs);

#define NV(n, v) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), \
                  NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE}
  nghttp2_nv nv[6] = {NV(":method", "POST"), NV(":scheme", "http"), NV(":path", G.path),
                      NV(":authority", G.authority), NV("content-type", "application/grpc"),
                      NV("te", "trailers")};
  memcpy(G.nv, nv, sizeof nv);

  nghttp2_session_callbacks_new(&G.cbs);
  nghttp2_session_callbacks_set_on_header_callback(G.cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(G.cbs, on_data);
  nghttp2_session_callbacks_set_on_stream_close_callback(G.cbs, on_close);

  signal(SIGPIPE, SIG_IGN);
  G.ep = epoll_create1(EPOLL_CLOEXEC);

  G.rng = G.seed * 0x9E3779B97F4A7C15ull | 1;
  G.conns = calloc(G.nconn, sizeof *G.conns);
  for (int i = 0; i < G.nconn; i++) {
    conn_t *c = &G.conns[i];
    c->head.next = c->head.prev = &c->head;
    c->fd = -1;
    conn_start(c);
  }

  uint64_t t_start = now_ns();
  G.warm_end = t_start + (uint64_t)(G.warmup * 1e9);
  G.end = G.warm_end + (uint64_t)(G.duration * 1e9);
  G.drain_end = G.end + (uint64_t)(G.drain * 1e9);
  G.next_arrival = t_start;
  struct rusage ru0, ru1;
  int warm_snap = 0;
  struct epoll_event evs[64];

  for (;;) {
    uint64_t now = now_ns();
    if (!warm_snap && now >= G.warm_end) getrusage(RUSAGE_SELF, &ru0), warm_snap = 1;
    if (now >= G.end && (G.minflight == 0 || now >= G.drain_end)) break;
    uint64_t deadline = now < G.end ? G.end : G.drain_end;
    if (!warm_snap && G.warm_end < deadline) deadline = G.warm_end;
    for (int i = 0; i < G.nconn; i++) {
      conn_t *c = &G.conns[i];
      if (c->state == 0 && now >= c->retry_at) conn_start(c);
      if (c->state == 0 && c->retry_at < deadline) deadline = c->retry_at;
    }
    pump(now);
    if (G.rate > 0 && G.next_arrival < G.end && G.next_arrival < deadline)
      deadline = G.next_arrival;
    for (int i = 0; i < G.nconn; i++)
      if (G.conns[i].state == 2) conn_flush(&G.conns[i]);
    int n = wait_until(evs, 64, deadline);
    for (int i = 0; i < n; i++) {
      conn_t *c = evs[i].data.ptr;
      if (c->state == 1) conn_up(c);
      else if (c->state == 2) {
        if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) conn_read(c);
        if (c->state == 2 && (evs[i].events & EPOLLOUT)) conn_flush(c);
      }
    }
  }
  uint64_t t_stop = now_ns();
  getrusage(RUSAGE_SELF, &ru1);
  if (!warm_snap) ru0 = ru1;

  qsort(G.lat, G.nlat, sizeof *G.lat, cmp_u64);
  double sum = 0;
  for (size_t i = 0; i < G.nlat; i++) sum += G.lat[i];
  double cu = tv(ru1.ru_utime) - tv(ru0.ru_utime), cs = tv(ru1.ru_stime) - tv(ru0.ru_stime);

  printf("{\"mode\":\"%s\",\"concurrency\":%d,\"connections\":%d,", G.rate > 0 ? "open" : "closed",
         G.conc, G.nconn);
  if (G.rate > 0) printf("\"rate\":%.3f,", G.rate);
  else printf("\"rate\":null,");
  printf("\"duration_s\":%.3f,\"warmup_s\":%.3f,\"elapsed_s\":%.3f,", G.duration, G.warmup,
         (t_stop - t_start) / 1e9);
  printf("\"sent\":%lu,\"answered\":%lu,\"ok\":%lu,\"mismatches\":%lu,\"errors\":{", G.sent,
         G.answered, G.ok, G.mismatch);
  const char *sep = "";
  for (int i = 1; i < E_N; i++) {
    if (!G.errs[i]) continue;
    if (ekey[i]) printf("%s\"%s\":%lu", sep, ekey[i], G.errs[i]);
    else printf("%s\"%d\":%lu", sep, i, G.errs[i]);
    sep = ",";
  }
  printf("},\"unfinished\":%lu,\"dropped\":%lu,\"reconnects\":%lu,", G.minflight, G.dropped,
         G.reconnects);
  printf("\"offered_rps\":%.1f,\"throughput_rps\":%.1f,", G.sent / G.duration, G.ok / G.duration);
  printf("\"latency_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f,\"mean\":%.3f},",
         pct(.5), pct(.9), pct(.99), pct(1), G.nlat ? sum / G.nlat / 1e6 : 0.0);
  printf("\"cpu_s\":%.4f,\"cpu_user_s\":%.4f,\"cpu_sys_s\":%.4f,\"cpu_us_per_req\":%.2f,", cu + cs,
         cu, cs, G.answered ? (cu + cs) / G.answered * 1e6 : 0.0);
  printf("\"cpu_total_s\":%.4f}\n", tv(ru1.ru_utime) + tv(ru1.ru_stime));
  return 0;
}
