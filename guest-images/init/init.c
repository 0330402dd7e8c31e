// pmemvm guest init: a tiny static PID 1 (built with musl, tens of KB) that
// runs one test mode and reports its result through the pmemvm exit port.
//
// The mode comes from the kernel command line: pmemvm_mode=NAME (default
// "demo"). Each mode prints "pmemvm-init: <mode> ok" or "... FAILED: why",
// then writes its status byte to the exit port, which ends pmemvm with it.
// Modes: demo, exit=N, dax, crash, reboot (see mode_dax and friends).
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#include "line.h"

#ifndef MAP_SHARED_VALIDATE
#define MAP_SHARED_VALIDATE 0x03
#endif
#ifndef MAP_SYNC
#define MAP_SYNC 0x80000
#endif
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

// Must match vmm::EXIT_PORT in pmemvm.
#define PMEMVM_EXIT_PORT 0xf4

static char cmdline[4096];

static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = format_line(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	// One write per line keeps lines whole on the serial console.
	if (n && write(1, buf, n) < 0) {
		/* nothing else to report to */
	}
}

// Ends the VM with `status` through the exit port; falls back to a reboot,
// which pmemvm also turns into a clean exit (status 0).
static void __attribute__((noreturn)) vm_exit(int status)
{
	unsigned char b = (unsigned char)status;
	// The serial driver sends queued output later, by interrupt: wait for
	// it, or the exit port ends the VM before the last lines leave.
	tcdrain(1);
	int fd = open("/dev/port", O_WRONLY);
	if (fd >= 0) {
		if (pwrite(fd, &b, 1, PMEMVM_EXIT_PORT) != 1)
			say("pmemvm-init: exit port write failed: %s", strerror(errno));
		close(fd);
	} else {
		say("pmemvm-init: cannot open /dev/port: %s", strerror(errno));
	}
	sync();
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

// Value of key=VALUE on the kernel command line, or NULL.
static const char *cmdline_value(const char *key, char *out, size_t len)
{
	size_t klen = strlen(key);
	for (const char *p = cmdline; *p;) {
		while (*p == ' ' || *p == '\n')
			p++;
		const char *end = p + strcspn(p, " \n");
		if ((size_t)(end - p) > klen && !strncmp(p, key, klen) && p[klen] == '=') {
			size_t n = end - p - klen - 1;
			if (n >= len)
				n = len - 1;
			memcpy(out, p + klen + 1, n);
			out[n] = 0;
			return out;
		}
		p = end;
	}
	return NULL;
}

static void mount_basics(void)
{
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) && errno != EBUSY)
		say("pmemvm-init: mount /dev: %s", strerror(errno));
	if (mount("proc", "/proc", "proc", 0, NULL))
		say("pmemvm-init: mount /proc: %s", strerror(errno));
	if (mount("sysfs", "/sys", "sysfs", 0, NULL))
		say("pmemvm-init: mount /sys: %s", strerror(errno));
}

static int read_cmdline(void)
{
	int fd = open("/proc/cmdline", O_RDONLY);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, cmdline, sizeof(cmdline) - 1);
	close(fd);
	if (n < 0)
		return -1;
	cmdline[n] = 0;
	return 0;
}

static ssize_t read_file(const char *path, char *buf, size_t len);

// libnvdimm registers pmem namespaces asynchronously, so /dev/pmemN may
// be missing (ENOENT) or not ready (ENXIO) when init starts (seen on a host
// with EPT/NPT, where boot is quick): give it a few seconds.
static void wait_for_device(const char *path)
{
	for (int i = 0; i < 500; i++) {
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd >= 0) {
			close(fd);
			return;
		}
		if (errno != ENOENT && errno != ENXIO)
			return;
		usleep(10000);
	}
}

// A distribution kernel brings its drivers as modules: the initramfs then
// lists them in MODULE_LIST, one path per line, dependencies first. Each
// gets the MODULE.KEY=VALUE words of the kernel command line as its
// parameters, as modprobe would give them.
#define MODULE_LIST "/lib/modules/load"

static int load_modules(void)
{
	static char list[8192];
	if (read_file(MODULE_LIST, list, sizeof(list)) < 0)
		return 0;
	int loaded = 0, failed = 0;
	for (char *path = strtok(list, "\n"); path; path = strtok(NULL, "\n")) {
		const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
		char name[64];
		size_t n = strcspn(base, ".");
		if (n >= sizeof(name))
			n = sizeof(name) - 1;
		for (size_t i = 0; i < n; i++)
			name[i] = base[i] == '-' ? '_' : base[i];
		name[n] = 0;
		char params[1024] = "";
		for (const char *p = cmdline; *p;) {
			p += strspn(p, " \n");
			size_t len = strcspn(p, " \n");
			if (len > n + 1 && !strncmp(p, name, n) && p[n] == '.' &&
			    strlen(params) + len + 2 < sizeof(params)) {
				strncat(params, p + n + 1, len - n - 1);
				strcat(params, " ");
			}
			p += len;
		}
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || (syscall(SYS_finit_module, fd, params, 0) && errno != EEXIST)) {
			say("pmemvm-init: loading module %s failed: %s", path, strerror(errno));
			failed++;
		} else {
			loaded++;
		}
		if (fd >= 0)
			close(fd);
	}
	say("pmemvm-init: loaded %d modules from " MODULE_LIST, loaded);
	return failed;
}

// Greets, then names each pmem disk the guest found, its size and whether
// the block layer offers DAX on it.
static int mode_demo(void)
{
	say("pmemvm-init: hello from the pmemvm guest");
	DIR *dir = opendir("/sys/block");
	if (!dir) {
		say("pmemvm-init: demo: /sys/block: %s", strerror(errno));
		return 1;
	}
	int found = 0;
	for (struct dirent *e; (e = readdir(dir));) {
		if (strncmp(e->d_name, "pmem", 4))
			continue;
		char path[300], size[32] = "", dax[8] = "";
		snprintf(path, sizeof(path), "/sys/block/%s/size", e->d_name);
		read_file(path, size, sizeof(size));
		snprintf(path, sizeof(path), "/sys/block/%s/queue/dax", e->d_name);
		read_file(path, dax, sizeof(dax));
		say("pmemvm-init: /dev/%s: %llu MiB, dax %s", e->d_name,
		    strtoull(size, NULL, 10) / 2048, dax[0] == '1' ? "on" : "off");
		found++;
	}
	closedir(dir);
	if (!found)
		say("pmemvm-init: no pmem disk (add one with --pmem file=PATH,size=SIZE)");
	return 0;
}

// ---------------------------------------------------------------------------
// DAX modes. The host (tests/e2e.rs) knows the file names and contents below
// and checks them in the disk images after the VM ends: keep both in step.

#ifndef STATX_ATTR_DAX
#define STATX_ATTR_DAX 0x00200000
#endif

static int failures;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

// When the previous check ended: each check's time is the work since then,
// which is what the host compares between VMMs.
static uint64_t last_check_ns;

// Prints "pmemvm-init: check DEV:NAME ok T us" or "... FAILED: why" and
// counts failures.
static int check(const char *dev, const char *name, int ok, const char *fmt, ...)
{
	uint64_t now = now_ns();
	uint64_t us = last_check_ns ? (now - last_check_ns) / 1000 : 0;
	last_check_ns = now;
	if (ok) {
		say("pmemvm-init: check %s:%s ok %llu us", dev, name, (unsigned long long)us);
		return 1;
	}
	char why[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	say("pmemvm-init: check %s:%s FAILED: %s", dev, name, why);
	failures++;
	return 0;
}

// Reads up to len-1 bytes of path into buf, NUL-terminated; -1 on error.
static ssize_t read_file(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	size_t got = 0;
	while (got < len - 1) {
		ssize_t n = read(fd, buf + got, len - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (n < 0) {
				int e = errno;
				close(fd);
				errno = e;
				return -1;
			}
			break;
		}
		got += n;
	}
	close(fd);
	buf[got] = 0;
	return got;
}

// Does the comma-separated option list `opts` hold exactly `opt`?
static int has_option(const char *opts, const char *opt)
{
	size_t len = strlen(opt);
	for (const char *p = opts; *p;) {
		size_t n = strcspn(p, ",");
		if (n == len && !strncmp(p, opt, len))
			return 1;
		p += n;
		if (*p)
			p++;
	}
	return 0;
}

// Checks the /proc/mounts line of mountpoint `mnt`: type `fs`, rw or ro,
// and dax=always (ext4 and xfs in 6.1 both print that for -o dax; xfs
// silently falls back to dax=never when the device cannot do DAX).
static void check_proc_mounts(const char *dev, const char *mnt, const char *fs, int ro)
{
	static char buf[8192];
	if (read_file("/proc/mounts", buf, sizeof(buf)) < 0) {
		check(dev, "proc-mounts-dax", 0, "read /proc/mounts: %s", strerror(errno));
		return;
	}
	for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
		char src[128], dir[128], type[32], opts[512];
		if (sscanf(line, "%127s %127s %31s %511s", src, dir, type, opts) != 4 || strcmp(dir, mnt))
			continue;
		int ok = !strcmp(type, fs) && has_option(opts, ro ? "ro" : "rw") &&
			 has_option(opts, "dax=always");
		check(dev, "proc-mounts-dax", ok, "want %s %s,dax=always, got '%s'", fs,
		      ro ? "ro" : "rw", line);
		return;
	}
	check(dev, "proc-mounts-dax", 0, "%s not in /proc/mounts", mnt);
}

static void check_queue_dax(const char *dev)
{
	char path[96], val[16];
	snprintf(path, sizeof(path), "/sys/block/%s/queue/dax", dev);
	if (read_file(path, val, sizeof(val)) < 0)
		check(dev, "queue-dax", 0, "read %s: %s", path, strerror(errno));
	else
		check(dev, "queue-dax", !strcmp(val, "1\n"), "%s is '%.4s'", path, val);
}

// Is the open file served by DAX? statx() reports STATX_ATTR_DAX (5.8+).
// Raw syscall: musl 1.2.3 has no statx() wrapper. Layout per linux/stat.h.
static void check_statx_dax(const char *dev, const char *name, const char *path)
{
	union {
		unsigned char raw[256];
		struct {
			uint32_t mask, blksize;
			uint64_t attributes;
			uint32_t nlink, uid, gid;
			uint16_t mode, spare;
			uint64_t ino, size, blocks, attributes_mask;
		} s;
	} stx;
	memset(&stx, 0, sizeof(stx));
	if (syscall(SYS_statx, AT_FDCWD, path, 0, 0x7ff /* STATX_BASIC_STATS */, &stx)) {
		check(dev, name, 0, "statx %s: %s", path, strerror(errno));
		return;
	}
	check(dev, name, (stx.s.attributes & STATX_ATTR_DAX) != 0,
	      "%s: STATX_ATTR_DAX not set (attributes %#llx, mask %#llx)", path,
	      (unsigned long long)stx.s.attributes, (unsigned long long)stx.s.attributes_mask);
}

// Writes `data` to a new file `path` with write(); returns the open fd.
static int write_new(const char *path, const char *data)
{
	int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	if (fd < 0)
		return -1;
	size_t len = strlen(data);
	if (write(fd, data, len) != (ssize_t)len) {
		int e = errno ? errno : EIO;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

// Writes `data` to a new file `path` through a MAP_SHARED mapping (on a DAX
// mount: straight into the pmem region); returns the open fd.
static int mmap_new(const char *path, const char *data)
{
	size_t len = strlen(data);
	int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	if (fd < 0)
		return -1;
	void *p = MAP_FAILED;
	if (ftruncate(fd, len) == 0)
		p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	memcpy(p, data, len);
	munmap(p, len);
	return fd;
}

// "FS:DEV" or "ro-FS:DEV", FS one of ext4, xfs.
struct dax_spec {
	char fs[8];
	char dev[32];
	char mnt[48];
	int ro;
	int mounted;
};

static int parse_spec(const char *s, struct dax_spec *d)
{
	memset(d, 0, sizeof(*d));
	if (!strncmp(s, "ro-", 3)) {
		d->ro = 1;
		s += 3;
	}
	const char *colon = strchr(s, ':');
	if (!colon || colon - s >= (long)sizeof(d->fs) || !colon[1] ||
	    strlen(colon + 1) >= sizeof(d->dev) || strchr(colon + 1, '/'))
		return -1;
	memcpy(d->fs, s, colon - s);
	strcpy(d->dev, colon + 1);
	if (strcmp(d->fs, "ext4") && strcmp(d->fs, "xfs"))
		return -1;
	snprintf(d->mnt, sizeof(d->mnt), "/mnt/%s", d->dev);
	return 0;
}

static int mount_dax(const struct dax_spec *d)
{
	char src[48];
	snprintf(src, sizeof(src), "/dev/%s", d->dev);
	if (mkdir(d->mnt, 0755) && errno != EEXIST)
		return check(d->dev, "mount", 0, "mkdir %s: %s", d->mnt, strerror(errno));
	wait_for_device(src);
	int rc = mount(src, d->mnt, d->fs, d->ro ? MS_RDONLY : 0, "dax");
	return check(d->dev, "mount", rc == 0, "mount -t %s -o %sdax %s %s: %s", d->fs,
		     d->ro ? "ro," : "", src, d->mnt, strerror(errno));
}

// Reads `path` back and compares it with `want`.
static void check_content(const char *dev, const char *name, const char *path, const char *want)
{
	char got[256];
	if (read_file(path, got, sizeof(got)) < 0)
		check(dev, name, 0, "read %s: %s", path, strerror(errno));
	else
		check(dev, name, !strcmp(got, want), "%s holds '%.64s', want '%s'", path, got,
		      want);
}

#define PAGE 4096

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static uint64_t median(uint64_t *v, int n)
{
	qsort(v, n, sizeof(*v), cmp_u64);
	return v[n / 2];
}

// A new file of `pages` pages, page i filled with 'a' + i % 26 by write().
static int pattern_file(const char *path, int pages)
{
	static char buf[PAGE];
	int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	if (fd < 0)
		return -1;
	for (int i = 0; i < pages; i++) {
		memset(buf, 'a' + i % 26, PAGE);
		if (pwrite(fd, buf, PAGE, (off_t)i * PAGE) != PAGE) {
			int e = errno ? errno : EIO;
			close(fd);
			errno = e;
			return -1;
		}
	}
	return fd;
}

// Is every byte of page `p` of the mapping `c`?
static int page_is(const volatile char *map, int p, char c)
{
	for (int i = 0; i < PAGE; i += 64)
		if (map[(size_t)p * PAGE + i] != c)
			return 0;
	return 1;
}

// virtio-pmem is not a synchronous DAX device: the guest must flush, so
// MAP_SYNC, which promises durability without one, must be refused.
static void check_map_sync(const char *dev, const char *mnt)
{
	char path[96];
	snprintf(path, sizeof(path), "%s/mapsync.dat", mnt);
	int fd = pattern_file(path, 1);
	if (fd < 0) {
		check(dev, "map-sync-eopnotsupp", 0, "%s: %s", path, strerror(errno));
		return;
	}
	void *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED_VALIDATE | MAP_SYNC, fd, 0);
	int e = errno;
	check(dev, "map-sync-eopnotsupp", p == MAP_FAILED && e == EOPNOTSUPP,
	      "mmap(MAP_SYNC) %s", p == MAP_FAILED ? strerror(e) : "succeeded");
	if (p != MAP_FAILED)
		munmap(p, PAGE);
	close(fd);
	unlink(path);
}

// Punches pages 2-3 out of an 8-page file seen through a DAX mapping, then
// allocates it up to 16 pages: the hole reads as zeroes, the rest is intact.
static void check_fallocate(const char *dev, const char *mnt)
{
	char path[96];
	snprintf(path, sizeof(path), "%s/falloc.dat", mnt);
	int fd = pattern_file(path, 8);
	if (fd < 0) {
		check(dev, "punch-hole", 0, "%s: %s", path, strerror(errno));
		return;
	}
	struct stat before, after;
	volatile char *map = mmap(NULL, 16 * PAGE, PROT_READ, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED || fstat(fd, &before)) {
		check(dev, "punch-hole", 0, "mmap/fstat %s: %s", path, strerror(errno));
		close(fd);
		return;
	}
	int ok = page_is(map, 2, 'c');
	int rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 2 * PAGE, 2 * PAGE);
	int e = errno;
	fstat(fd, &after);
	check(dev, "punch-hole",
	      ok && rc == 0 && page_is(map, 1, 'b') && page_is(map, 2, 0) && page_is(map, 3, 0) &&
		      page_is(map, 4, 'e') && after.st_size == 8 * PAGE &&
		      after.st_blocks < before.st_blocks,
	      "rc %d (%s), size %lld, blocks %lld -> %lld, pages 1-4 '%c%c%c%c'", rc,
	      rc ? strerror(e) : "ok", (long long)after.st_size, (long long)before.st_blocks,
	      (long long)after.st_blocks, map[PAGE], map[2 * PAGE] ? map[2 * PAGE] : '0',
	      map[3 * PAGE] ? map[3 * PAGE] : '0', map[4 * PAGE]);
	rc = fallocate(fd, 0, 0, 16 * PAGE);
	e = errno;
	fstat(fd, &after);
	check(dev, "fallocate",
	      rc == 0 && after.st_size == 16 * PAGE && after.st_blocks >= 16 * PAGE / 512 &&
		      page_is(map, 2, 0) && page_is(map, 12, 0) && page_is(map, 7, 'h'),
	      "rc %d (%s), size %lld, blocks %lld", rc, rc ? strerror(e) : "ok",
	      (long long)after.st_size, (long long)after.st_blocks);
	munmap((void *)map, 16 * PAGE);
	close(fd);
	unlink(path);
}

// Truncates a 4-page file while it is mapped: a child touching page 2 must
// die of SIGBUS (fork, because PID 1 cannot take a fatal signal); after the
// file grows back, page 2 reads as zeroes and page 0 is intact.
static void check_truncate_mapped(const char *dev, const char *mnt)
{
	char path[96];
	snprintf(path, sizeof(path), "%s/trunc.dat", mnt);
	int fd = pattern_file(path, 4);
	volatile char *map = MAP_FAILED;
	if (fd >= 0)
		map = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED || !page_is(map, 2, 'c') || ftruncate(fd, PAGE)) {
		check(dev, "truncate-mapped-sigbus", 0, "set up %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	pid_t pid = fork();
	if (pid == 0) {
		map[2 * PAGE] = 'x';
		_exit(0);
	}
	int status = 0;
	if (pid > 0)
		waitpid(pid, &status, 0);
	check(dev, "truncate-mapped-sigbus", pid > 0 && WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS,
	      "child touching page 2 past the end: %s %d", pid < 0 ? "fork failed" :
	      WIFSIGNALED(status) ? "signal" : "exit status", pid < 0 ? errno :
	      WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
	int rc = ftruncate(fd, 4 * PAGE);
	check(dev, "truncate-mapped-regrow", rc == 0 && page_is(map, 0, 'a') && page_is(map, 2, 0),
	      "ftruncate back: %s, page 0 '%c', page 2 0x%02x", rc ? strerror(errno) : "ok", map[0],
	      (unsigned char)map[2 * PAGE]);
	munmap((void *)map, 4 * PAGE);
	close(fd);
	unlink(path);
}

#define TOUCH_PAGES 32
#define FSYNC_ROUNDS 8

// First write to each page of a fresh mapping (guest page fault, the file
// system's DAX fault, and the VMM's population and mkwrite behind it)
// against a second write to the same page, timed with rdtsc; then fsync of
// one dirtied page. Prints the medians as metric lines for the host.
static void check_touch_and_fsync(const char *dev, const char *mnt)
{
	char path[96];
	snprintf(path, sizeof(path), "%s/touch.dat", mnt);
	int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	volatile char *map = MAP_FAILED;
	if (fd >= 0 && fallocate(fd, 0, 0, TOUCH_PAGES * PAGE) == 0)
		map = mmap(NULL, TOUCH_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED) {
		check(dev, "first-touch", 0, "set up %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	uint64_t first[TOUCH_PAGES], warm[TOUCH_PAGES];
	uint64_t t0 = now_ns(), c0 = __rdtsc();
	for (int i = 0; i < TOUCH_PAGES; i++) {
		volatile char *p = map + (size_t)i * PAGE;
		uint64_t a = __rdtsc();
		p[0] = (char)('A' + i % 26);
		uint64_t b = __rdtsc();
		p[64] = (char)('A' + i % 26);
		uint64_t c = __rdtsc();
		first[i] = b - a;
		warm[i] = c - b;
	}
	uint64_t t1 = now_ns(), c1 = __rdtsc();
	// The TSC rate, from the same interval on the monotonic clock.
	double ns_per_tick = c1 > c0 ? (double)(t1 - t0) / (double)(c1 - c0) : 0;
	int ok = ns_per_tick > 0;
	char got[2] = { 0, 0 };
	for (int i = 0; ok && i < TOUCH_PAGES; i++)
		ok = pread(fd, got, 1, (off_t)i * PAGE) == 1 && got[0] == 'A' + i % 26;
	check(dev, "first-touch", ok, "page data not read back (or no TSC), got '%c'", got[0]);
	say("pmemvm-init: metric %s:first-touch-write-p50 %.0f ns", dev,
	    median(first, TOUCH_PAGES) * ns_per_tick);
	say("pmemvm-init: metric %s:warm-write-p50 %.0f ns", dev, median(warm, TOUCH_PAGES) * ns_per_tick);

	// Round 0 warms the journal and the flush path; it is not counted.
	uint64_t fsync_us[FSYNC_ROUNDS];
	ok = 1;
	for (int r = 0; ok && r <= FSYNC_ROUNDS; r++) {
		map[(size_t)(r % TOUCH_PAGES) * PAGE + 128] = (char)r;
		uint64_t a = now_ns();
		ok = fsync(fd) == 0;
		if (r)
			fsync_us[r - 1] = (now_ns() - a) / 1000;
	}
	check(dev, "fsync-1page", ok, "fsync %s: %s", path, strerror(errno));
	if (ok)
		say("pmemvm-init: metric %s:fsync-1page-p50 %llu us", dev,
		    (unsigned long long)median(fsync_us, FSYNC_ROUNDS));
	munmap((void *)map, TOUCH_PAGES * PAGE);
	close(fd);
	unlink(path);
}

static void dax_writable(const struct dax_spec *d)
{
	char hello[96], mapped[96], want_hello[96], want_mapped[96];
	snprintf(hello, sizeof(hello), "%s/hello.txt", d->mnt);
	snprintf(mapped, sizeof(mapped), "%s/mmap.txt", d->mnt);
	snprintf(want_hello, sizeof(want_hello), "pmemvm dax write %s\n", d->dev);
	snprintf(want_mapped, sizeof(want_mapped), "pmemvm dax mmap %s\n", d->dev);

	int fd1 = write_new(hello, want_hello);
	check(d->dev, "write", fd1 >= 0, "%s: %s", hello, strerror(errno));
	int fd2 = mmap_new(mapped, want_mapped);
	check(d->dev, "mmap-write", fd2 >= 0, "%s: %s", mapped, strerror(errno));
	if (fd1 >= 0) {
		check(d->dev, "fsync-write", fsync(fd1) == 0, "%s: %s", hello, strerror(errno));
		close(fd1);
	}
	if (fd2 >= 0) {
		check(d->dev, "fsync-mmap", fsync(fd2) == 0, "%s: %s", mapped, strerror(errno));
		close(fd2);
	}
	say("pmemvm-init: fsync returned %s", d->dev);
	check_content(d->dev, "readback-write", hello, want_hello);
	check_content(d->dev, "readback-mmap", mapped, want_mapped);
	check_statx_dax(d->dev, "statx-dax", mapped);
	check_map_sync(d->dev, d->mnt);
	check_fallocate(d->dev, d->mnt);
	check_truncate_mapped(d->dev, d->mnt);
	check_touch_and_fsync(d->dev, d->mnt);
}

static void dax_readonly(const struct dax_spec *d)
{
	char path[96], want[96];
	snprintf(path, sizeof(path), "%s/ro.txt", d->mnt);
	snprintf(want, sizeof(want), "pmemvm readonly %s\n", d->dev);
	check_content(d->dev, "ro-content", path, want);
	check_statx_dax(d->dev, "statx-dax", path);
	snprintf(path, sizeof(path), "%s/new.txt", d->mnt);
	int fd = open(path, O_CREAT | O_WRONLY, 0644);
	check(d->dev, "ro-write-erofs", fd < 0 && errno == EROFS, "open %s for writing: %s",
	      path, fd < 0 ? strerror(errno) : "succeeded");
	if (fd >= 0)
		close(fd);
}

// pmemvm_mode=dax pmemvm_dax=SPEC[,SPEC...]: mounts each device with -o dax,
// checks that DAX is really on, writes and reads back (writable) or reads the
// host's ro.txt and expects EROFS (ro-), then unmounts, which leaves clean
// file systems for the host to inspect.
static int mode_dax(void)
{
	char list[256];
	if (!cmdline_value("pmemvm_dax", list, sizeof(list))) {
		say("pmemvm-init: dax: no pmemvm_dax=FS:DEV[,...] on the command line");
		return 2;
	}
	struct dax_spec specs[8];
	int n = 0;
	last_check_ns = now_ns();
	for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
		if (n == 8 || parse_spec(tok, &specs[n])) {
			say("pmemvm-init: dax: bad spec '%s' (want [ro-]ext4|xfs:DEV, at most 8)",
			    tok);
			return 2;
		}
		n++;
	}
	for (int i = 0; i < n; i++) {
		struct dax_spec *d = &specs[i];
		d->mounted = mount_dax(d);
		if (!d->mounted)
			continue;
		check_proc_mounts(d->dev, d->mnt, d->fs, d->ro);
		check_queue_dax(d->dev);
		if (d->ro)
			dax_readonly(d);
		else
			dax_writable(d);
	}
	for (int i = 0; i < n; i++) {
		if (specs[i].mounted)
			check(specs[i].dev, "umount", umount(specs[i].mnt) == 0, "umount %s: %s",
			      specs[i].mnt, strerror(errno));
	}
	say("pmemvm-init: dax done, %d failed", failures);
	return failures ? 1 : 0;
}

// pmemvm_mode=crash pmemvm_dax=FS:DEV[,FS:DEV...]: on each device, writes
// crash.txt through a DAX mapping and fsyncs it, then stores unsynced.txt
// the same way with no fsync; says "fsync returned crash" and waits to be
// killed. The host may also cut the power under the backing files: then
// crash.txt must survive and unsynced.txt may be lost.
static int mode_crash(void)
{
	char list[256];
	if (!cmdline_value("pmemvm_dax", list, sizeof(list))) {
		say("pmemvm-init: crash: want pmemvm_dax=ext4|xfs:DEV[,...] on the command line");
		return 2;
	}
	struct dax_spec specs[8];
	int n = 0;
	for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
		if (n == 8 || parse_spec(tok, &specs[n]) || specs[n].ro) {
			say("pmemvm-init: crash: bad spec '%s' (want ext4|xfs:DEV, at most 8)", tok);
			return 2;
		}
		n++;
	}
	for (int i = 0; i < n; i++) {
		struct dax_spec *d = &specs[i];
		if (!mount_dax(d))
			return 1;
		char path[96], want[96];
		snprintf(path, sizeof(path), "%s/crash.txt", d->mnt);
		snprintf(want, sizeof(want), "pmemvm crash %s\n", d->dev);
		int fd = mmap_new(path, want);
		if (!check(d->dev, "mmap-write", fd >= 0, "%s: %s", path, strerror(errno)))
			return 1;
		if (!check(d->dev, "fsync-mmap", fsync(fd) == 0, "%s: %s", path, strerror(errno)))
			return 1;
		close(fd);
		snprintf(path, sizeof(path), "%s/unsynced.txt", d->mnt);
		snprintf(want, sizeof(want), "pmemvm unsynced %s\n", d->dev);
		fd = mmap_new(path, want);
		if (!check(d->dev, "mmap-write-unsynced", fd >= 0, "%s: %s", path, strerror(errno)))
			return 1;
	}
	say("pmemvm-init: fsync returned crash");
	for (;;)
		pause();
}

// pmemvm_mode=reboot: a guest-initiated reboot, which pmemvm ends with 0.
static int mode_reboot(void)
{
	say("pmemvm-init: rebooting");
	sync();
	reboot(RB_AUTOBOOT);
	say("pmemvm-init: reboot: %s", strerror(errno));
	return 1;
}

// ---------------------------------------------------------------------------
// Raw-device modes for the fault engines: O_DIRECT writes to /dev/pmemN touch
// exactly the pages written, so the host can count what each flush writes
// back. tests/e2e.rs knows the offsets and contents below.

#define RAW_PAGE 4096
// Pages written first (stride 7 from page 10), then page 17 again.
static const int raw_pages[] = { 10, 17, 24, 31, 38 };

static int raw_write(int fd, int page, const char *dev, const char *what)
{
	static char buf[RAW_PAGE] __attribute__((aligned(RAW_PAGE)));
	int n = snprintf(buf, sizeof(buf), "pmemvm raw %s page %d %s\n", dev, page, what);
	memset(buf + n, '.', sizeof(buf) - n);
	return pwrite(fd, buf, RAW_PAGE, (off_t)page * RAW_PAGE) == RAW_PAGE ? 0 : -1;
}

// K pages, fsync, fsync with nothing dirty, one page again, fsync.
static int raw_device(const char *dev)
{
	char path[64];
	snprintf(path, sizeof(path), "/dev/%s", dev);
	wait_for_device(path);
	int fd = open(path, O_RDWR | O_DIRECT);
	if (fd < 0) {
		say("pmemvm-init: raw %s: open: %s", dev, strerror(errno));
		return 1;
	}
	int bad = 0;
	for (size_t i = 0; i < sizeof(raw_pages) / sizeof(raw_pages[0]); i++)
		bad |= raw_write(fd, raw_pages[i], dev, "first");
	bad |= fsync(fd);
	bad |= fsync(fd);
	bad |= raw_write(fd, 17, dev, "again");
	bad |= fsync(fd);
	close(fd);
	if (bad)
		say("pmemvm-init: raw %s FAILED: %s", dev, strerror(errno));
	else
		say("pmemvm-init: raw %s ok", dev);
	return bad ? 1 : 0;
}

// Two writers race on the same 8 pages, each on its own 512-byte sector,
// each fsyncing after every round, so flushes run while the other writes.
#define STRESS_PAGES 8
#define STRESS_ROUNDS 40

static int stress_writer(const char *dev, int who)
{
	char path[64];
	snprintf(path, sizeof(path), "/dev/%s", dev);
	wait_for_device(path);
	int fd = open(path, O_RDWR | O_DIRECT);
	if (fd < 0)
		return 1;
	static uint64_t sector[64] __attribute__((aligned(512)));
	for (int round = 1; round <= STRESS_ROUNDS; round++) {
		for (int p = 0; p < STRESS_PAGES; p++) {
			sector[0] = 0x706d656d766d0000ull | (uint64_t)who << 8;
			sector[1] = (uint64_t)round;
			off_t at = (off_t)(100 + p) * RAW_PAGE + who * 512;
			if (pwrite(fd, sector, 512, at) != 512)
				return 1;
		}
		if (fsync(fd))
			return 1;
	}
	close(fd);
	return 0;
}

static int stress_device(const char *dev)
{
	pid_t kids[2];
	for (int who = 0; who < 2; who++) {
		kids[who] = fork();
		if (kids[who] == 0)
			_exit(stress_writer(dev, who));
		if (kids[who] < 0)
			return 1;
	}
	int bad = 0;
	for (int who = 0; who < 2; who++) {
		int st = 0;
		if (waitpid(kids[who], &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st))
			bad = 1;
	}
	say("pmemvm-init: stress %s %s", dev, bad ? "FAILED" : "ok");
	return bad;
}

// pmemvm_mode=raw pmemvm_raw=DEV[,DEV...] [pmemvm_stress=DEV[,DEV...]]: every
// device runs in its own process, so that with several vCPUs the devices are
// served at once (and, on a full host filesystem, all of them wait at once).
static int mode_raw(void)
{
	char raw[256] = "", stress[256] = "", go[32] = "";
	cmdline_value("pmemvm_raw", raw, sizeof(raw));
	cmdline_value("pmemvm_stress", stress, sizeof(stress));
	// pmemvm_go=DEV: wait until the host writes "pmemvm-go" into page 0 of
	// DEV's file, so that it can fill its filesystem first.
	if (cmdline_value("pmemvm_go", go, sizeof(go))) {
		char path[64];
		static char buf[RAW_PAGE] __attribute__((aligned(RAW_PAGE)));
		snprintf(path, sizeof(path), "/dev/%s", go);
		wait_for_device(path);
		int fd = open(path, O_RDONLY | O_DIRECT);
		if (fd < 0) {
			say("pmemvm-init: raw: open %s: %s", path, strerror(errno));
			return 1;
		}
		say("pmemvm-init: raw waiting for go on %s", go);
		while (pread(fd, buf, RAW_PAGE, 0) == RAW_PAGE && memcmp(buf, "pmemvm-go", 9))
			usleep(100 * 1000);
		close(fd);
		say("pmemvm-init: raw go");
	}
	pid_t kids[16];
	int n = 0;
	char *lists[2] = { raw, stress };
	for (int l = 0; l < 2; l++) {
		for (char *save = NULL, *dev = strtok_r(lists[l], ",", &save); dev && n < 16;
		     dev = strtok_r(NULL, ",", &save)) {
			kids[n] = fork();
			if (kids[n] == 0)
				_exit(l == 0 ? raw_device(dev) : stress_device(dev));
			if (kids[n] < 0)
				return 1;
			n++;
		}
	}
	if (n == 0) {
		say("pmemvm-init: raw: want pmemvm_raw=DEV[,...] or pmemvm_stress=DEV[,...]");
		return 1;
	}
	int bad = 0;
	for (int i = 0; i < n; i++) {
		int st = 0;
		if (waitpid(kids[i], &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st))
			bad = 1;
	}
	return bad;
}

// pmemvm_mode=acks pmemvm_raw=DEV: write, fsync, acknowledge, forever, until
// the host kills pmemvm. Sequence number N goes to page 10 + N % 64 of DEV;
// "pmemvm-init: ack N" means N is durable.
static int mode_acks(void)
{
	char dev[32], path[64];
	static char buf[RAW_PAGE] __attribute__((aligned(RAW_PAGE)));
	if (!cmdline_value("pmemvm_raw", dev, sizeof(dev))) {
		say("pmemvm-init: acks: want pmemvm_raw=DEV");
		return 1;
	}
	snprintf(path, sizeof(path), "/dev/%s", dev);
	wait_for_device(path);
	int fd = open(path, O_RDWR | O_DIRECT);
	if (fd < 0) {
		say("pmemvm-init: acks: open %s: %s", path, strerror(errno));
		return 1;
	}
	for (unsigned long seq = 1;; seq++) {
		memset(buf, 0, sizeof(buf));
		snprintf(buf, sizeof(buf), "pmemvm ack %lu\n", seq);
		if (pwrite(fd, buf, RAW_PAGE, (off_t)(10 + seq % 64) * RAW_PAGE) != RAW_PAGE ||
		    fsync(fd)) {
			say("pmemvm-init: acks: seq %lu: %s", seq, strerror(errno));
			return 1;
		}
		say("pmemvm-init: ack %lu", seq);
	}
}

struct mode {
	const char *name;
	int (*run)(void);
};

static const struct mode modes[] = {
	{ "demo", mode_demo },
	{ "dax", mode_dax },
	{ "crash", mode_crash },
	{ "reboot", mode_reboot },
	{ "raw", mode_raw },
	{ "acks", mode_acks },
};

int main(void)
{
	say("pmemvm-init: started");
	mount_basics();
	if (read_cmdline())
		say("pmemvm-init: cannot read /proc/cmdline: %s", strerror(errno));
	if (load_modules())
		vm_exit(3);

	char buf[64];
	const char *name = cmdline_value("pmemvm_mode", buf, sizeof(buf));
	if (!name)
		name = "demo";

	// exit=N: end with status N, for testing the exit port itself.
	if (!strncmp(name, "exit=", 5)) {
		int status = atoi(name + 5);
		say("pmemvm-init: exiting with status %d", status);
		vm_exit(status);
	}

	for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
		if (strcmp(modes[i].name, name))
			continue;
		int rc = modes[i].run();
		if (rc)
			say("pmemvm-init: %s FAILED (status %d)", name, rc);
		else
			say("pmemvm-init: %s ok", name);
		vm_exit(rc);
	}
	say("pmemvm-init: unknown mode '%s'", name);
	vm_exit(2);
}
