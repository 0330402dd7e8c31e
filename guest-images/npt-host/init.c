// The NPT host's init: PID 1 of the L1 Linux that QEMU TCG runs with AMD
// SVM and nested paging. It shows the machine's file system at its own
// paths (read-only, over 9p), mounts a scratch disk at /scratch, checks
// that KVM has nested paging, runs the one command the runner asked for,
// reports its status, and ends the VM.
//
// The runner (guest-images/npt-host/run) passes, on the kernel command
// line, npt.job=PATH: a file on the machine's file system holding, each
// field ended by a NUL byte, the working directory, the argument count,
// the arguments, then the environment (KEY=VALUE). The command's stdout
// and stderr go to the virtio-serial ports named "stdout" and "stderr";
// one line "status N" (or "error TEXT") goes to the port "status".
//
// Two things let the runner tell a hung command from a hung L1: a
// heartbeat per CPU, its digit every few seconds on the port "alive" from
// a process pinned there (a CPU that cannot schedule it has locked up), and
// npt.timeout=SECS, after which init lists every process with its state
// and kernel stack, kills the command and reports "timeout SECS".
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../init/line.h"

#define HOST "/host"
#define JOB_MAX (1 << 20)

static int status_fd = -1;

static void say(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = format_line(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n && write(2, buf, n) < 0) {
		/* the console is all there is */
	}
}

// Ends L1. QEMU runs with -no-reboot, so the reset ends QEMU.
static void __attribute__((noreturn)) finish(void)
{
	sync();
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

// A line for the runner, on the status port, and on the console too.
static void report(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = format_line(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	say("npt-host: %.*s", n > 0 ? n - 1 : 0, buf);
	if (status_fd >= 0 && write(status_fd, buf, n) != n)
		say("npt-host: writing the status port: %s", strerror(errno));
}

// A failure of the NPT host itself, not of the command.
static void __attribute__((noreturn)) fail(const char *fmt, ...)
{
	char buf[480];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	report("error %s", buf);
	finish();
}

static void must_mount(const char *src, const char *dst, const char *type, unsigned long flags,
		       const char *opts)
{
	if (mount(src, dst, type, flags, opts))
		fail("mount %s on %s (%s): %s", src, dst, type ? type : "bind", strerror(errno));
}

static ssize_t read_file(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t have = 0;
	for (;;) {
		ssize_t n = read(fd, buf + have, len - 1 - have);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		have += n;
		if (have == len - 1)
			break;
	}
	close(fd);
	buf[have] = 0;
	return have;
}

// The value of KEY=VALUE on the kernel command line, or NULL.
static char *cmdline_value(const char *cmdline, const char *key)
{
	size_t klen = strlen(key);
	for (const char *p = cmdline; *p;) {
		p += strspn(p, " \n");
		size_t len = strcspn(p, " \n");
		if (len > klen && !strncmp(p, key, klen) && p[klen] == '=')
			return strndup(p + klen + 1, len - klen - 1);
		p += len;
	}
	return NULL;
}

// Shows each top-level entry of the machine's root at its own path:
// directories as read-only bind mounts, symlinks (merged /usr) as they are.
// /proc, /sys, /dev and /run get L1's own; /scratch is L1's disk.
static void show_host_root(void)
{
	DIR *d = opendir(HOST);
	if (!d)
		fail("open " HOST ": %s", strerror(errno));
	static const char *own[] = { ".", "..", "proc", "sys", "dev", "run", "scratch", "host" };
	struct dirent *e;
	while ((e = readdir(d))) {
		int skip = 0;
		for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++)
			skip |= !strcmp(e->d_name, own[i]);
		if (skip)
			continue;
		char src[512], dst[512];
		snprintf(src, sizeof(src), HOST "/%s", e->d_name);
		snprintf(dst, sizeof(dst), "/%s", e->d_name);
		struct stat st;
		if (lstat(src, &st))
			continue;
		if (S_ISLNK(st.st_mode)) {
			char target[512];
			ssize_t n = readlink(src, target, sizeof(target) - 1);
			if (n > 0) {
				target[n] = 0;
				unlink(dst);
				if (symlink(target, dst))
					say("npt-host: symlink %s: %s", dst, strerror(errno));
			}
		} else if (S_ISDIR(st.st_mode)) {
			if (mkdir(dst, 0755) && errno != EEXIST)
				fail("mkdir %s: %s", dst, strerror(errno));
			must_mount(src, dst, NULL, MS_BIND | MS_REC, NULL);
		}
	}
	closedir(d);
}

// The virtio-serial port named `name`, opened for writing, or -1.
static int open_port(const char *name)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return -1;
	struct dirent *e;
	int fd = -1;
	while (fd < 0 && (e = readdir(d))) {
		char path[300], buf[64];
		snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
		if (read_file(path, buf, sizeof(buf)) <= 0)
			continue;
		buf[strcspn(buf, "\n")] = 0;
		if (strcmp(buf, name))
			continue;
		snprintf(path, sizeof(path), "/dev/%s", e->d_name);
		fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd < 0)
			say("npt-host: open %s: %s", path, strerror(errno));
	}
	closedir(d);
	return fd;
}

// Nested paging is the point of this host: say so plainly when KVM lacks it.
static void check_kvm(void)
{
	char buf[64];
	if (access("/dev/kvm", R_OK | W_OK))
		fail("no usable /dev/kvm in L1 (%s): does QEMU's -cpu model have +svm?",
		     strerror(errno));
	if (read_file("/sys/module/kvm_amd/parameters/npt", buf, sizeof(buf)) <= 0)
		fail("kvm_amd is not loaded in L1: does QEMU's -cpu model have +svm?");
	if (buf[0] != 'Y' && buf[0] != '1')
		fail("KVM in L1 has no nested paging (kvm_amd.npt=%.1s): QEMU's -cpu model needs +npt",
		     buf);
	char tdp[16] = "?";
	if (read_file("/sys/module/kvm/parameters/tdp_mmu", tdp, sizeof(tdp)) > 0)
		tdp[strcspn(tdp, "\n")] = 0;
	say("npt-host: KVM with nested paging (tdp_mmu=%s)", tdp);
}

struct job {
	char *cwd;
	char **argv;
	char **envp;
};

// Splits the job file into its NUL-ended fields.
static struct job read_job(const char *path)
{
	static char raw[JOB_MAX];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		fail("open the job file %s: %s", path, strerror(errno));
	size_t len = 0;
	for (;;) {
		ssize_t n = read(fd, raw + len, sizeof(raw) - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail("read %s: %s", path, strerror(errno));
		if (n == 0)
			break;
		len += n;
		if (len == sizeof(raw))
			fail("the job file %s is over %d bytes", path, JOB_MAX);
	}
	close(fd);
	size_t fields = 0;
	for (size_t i = 0; i < len; i++)
		fields += raw[i] == 0;
	if (len == 0 || raw[len - 1] != 0 || fields < 3)
		fail("the job file %s is malformed", path);
	char **f = calloc(fields + 2, sizeof(char *));
	if (!f)
		fail("out of memory");
	for (size_t i = 0, at = 0; i < fields; i++) {
		f[i] = raw + at;
		at += strlen(raw + at) + 1;
	}
	char *end;
	unsigned long argc = strtoul(f[1], &end, 10);
	if (*end || argc == 0 || argc > fields - 2)
		fail("the job file %s has a bad argument count '%s'", path, f[1]);
	struct job job = { .cwd = f[0], .argv = f + 2, .envp = f + 2 + argc + 1 };
	// The environment starts after the arguments; move it one slot on so
	// that argv can end with its NULL.
	size_t envc = fields - 2 - argc;
	memmove(job.envp, f + 2 + argc, envc * sizeof(char *));
	job.envp[envc] = NULL;
	job.argv[argc] = NULL;
	return job;
}

#define HEARTBEAT_SECS 5

// Per CPU, a process pinned to it that writes the CPU's digit (0-9, then
// a-z) on the "alive" port every HEARTBEAT_SECS: a CPU that stops
// scheduling it has locked up, even while the others run on.
static void start_heartbeat(void)
{
	int fd = open_port("alive");
	if (fd < 0) {
		say("npt-host: no virtio-serial port named 'alive': no heartbeat");
		return;
	}
	static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	for (long cpu = 0; cpu < cpus && cpu < (long)sizeof(digits) - 1; cpu++) {
		pid_t pid = fork();
		if (pid < 0)
			fail("fork: %s", strerror(errno));
		if (pid)
			continue;
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set))
			say("npt-host: pin the heartbeat to CPU %ld: %s", cpu, strerror(errno));
		prctl(PR_SET_NAME, "heartbeat");
		for (;;) {
			if (write(fd, &digits[cpu], 1) != 1 && errno != EINTR && errno != EAGAIN)
				_exit(0);
			sleep(HEARTBEAT_SECS);
		}
	}
	close(fd);
}

static volatile sig_atomic_t timed_out;
static void on_alarm(int sig)
{
	(void)sig;
	timed_out = 1;
}

// One thread's name, state, wait channel and kernel stack, on the console.
static void dump_thread(long pid, long tid)
{
	char path[80], stat[512], wchan[64] = "", stack[2048] = "";
	snprintf(path, sizeof(path), "/proc/%ld/task/%ld/stat", pid, tid);
	if (read_file(path, stat, sizeof(stat)) <= 0)
		return;
	// "TID (comm) S ...": the state follows the last ')'.
	char *paren = strrchr(stat, ')');
	char *comm = strchr(stat, '(');
	if (!paren || !comm || paren[1] != ' ')
		return;
	*paren = 0;
	snprintf(path, sizeof(path), "/proc/%ld/task/%ld/wchan", pid, tid);
	read_file(path, wchan, sizeof(wchan));
	say("npt-host: process %ld thread %ld %s state %c wchan %s", pid, tid, comm + 1, paren[2],
	    wchan[0] ? wchan : "-");
	snprintf(path, sizeof(path), "/proc/%ld/task/%ld/stack", pid, tid);
	if (read_file(path, stack, sizeof(stack)) > 0) {
		for (char *line = strtok(stack, "\n"); line; line = strtok(NULL, "\n"))
			say("npt-host:     %s", line);
	}
}

// Every thread of every user process, on the console: what a timed-out
// command was stuck in.
static void dump_processes(void)
{
	DIR *d = opendir("/proc");
	if (!d)
		return;
	struct dirent *e;
	while ((e = readdir(d))) {
		char *end;
		long pid = strtol(e->d_name, &end, 10);
		if (*end || pid <= 2)
			continue;
		char path[80], stat[512];
		snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
		if (read_file(path, stat, sizeof(stat)) <= 0)
			continue;
		// Not the kernel's threads (children of kthreadd).
		char *paren = strrchr(stat, ')');
		if (!paren || strtol(paren + 4, NULL, 10) == 2)
			continue;
		snprintf(path, sizeof(path), "/proc/%ld/task", pid);
		DIR *t = opendir(path);
		if (!t)
			continue;
		struct dirent *te;
		while ((te = readdir(t))) {
			long tid = strtol(te->d_name, &end, 10);
			if (!*end && tid > 0)
				dump_thread(pid, tid);
		}
		closedir(t);
	}
	closedir(d);
}

// Runs the job; its exit status, shell style (128 + N for signal N), or
// -1 when it ran past timeout seconds (0: no limit) and was killed.
static int run_job(struct job *job, int out, int err, unsigned timeout)
{
	pid_t pid = fork();
	if (pid < 0)
		fail("fork: %s", strerror(errno));
	if (pid == 0) {
		int null = open("/dev/null", O_RDONLY);
		if (null < 0 || dup2(null, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
			_exit(126);
		if (chdir(job->cwd)) {
			dprintf(2, "npt-host: cd %s: %s\n", job->cwd, strerror(errno));
			_exit(126);
		}
		setsid();
		environ = job->envp;
		// Scratch is the one writable place: temp files go there.
		setenv("TMPDIR", "/scratch/tmp", 1);
		setenv("NPT_HOST", "1", 1);
		execvp(job->argv[0], job->argv);
		dprintf(2, "npt-host: cannot run %s: %s\n", job->argv[0], strerror(errno));
		_exit(errno == ENOENT ? 127 : 126);
	}
	struct sigaction sa = { .sa_handler = on_alarm };
	sigaction(SIGALRM, &sa, NULL);
	alarm(timeout);
	// PID 1 reaps every orphan; the job's own status is the one returned.
	for (;;) {
		int st;
		pid_t got = waitpid(-1, &st, 0);
		if (got < 0 && errno == EINTR && timed_out) {
			say("npt-host: the command ran past %u s; its processes:", timeout);
			dump_processes();
			kill(-pid, SIGKILL);
			return -1;
		}
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			fail("waitpid: %s", strerror(errno));
		if (got == pid)
			return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
	}
}

int main(void)
{
	int console = open("/dev/console", O_RDWR);
	if (console >= 0) {
		dup2(console, 1);
		dup2(console, 2);
	}
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) && errno != EBUSY)
		say("npt-host: mount /dev: %s", strerror(errno));
	must_mount("proc", "/proc", "proc", 0, NULL);
	must_mount("sysfs", "/sys", "sysfs", 0, NULL);
	status_fd = open_port("status");
	if (status_fd < 0)
		say("npt-host: no virtio-serial port named 'status'");

	static char cmdline[4096];
	if (read_file("/proc/cmdline", cmdline, sizeof(cmdline)) < 0)
		fail("read /proc/cmdline: %s", strerror(errno));
	char *job_path = cmdline_value(cmdline, "npt.job");
	if (!job_path)
		fail("no npt.job= on the kernel command line");

	must_mount("hostroot", HOST, "9p", MS_RDONLY,
		   "trans=virtio,version=9p2000.L,msize=512000,cache=loose");
	show_host_root();
	must_mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	mkdir("/dev/shm", 01777);
	must_mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	if (mount("/dev/vda", "/scratch", "ext4", 0, NULL))
		fail("mount the scratch disk /dev/vda on /scratch: %s", strerror(errno));
	if (mkdir("/scratch/tmp", 01777) && errno != EEXIST)
		fail("mkdir /scratch/tmp: %s", strerror(errno));
	chmod("/scratch/tmp", 01777);
	mount("tracefs", "/sys/kernel/tracing", "tracefs", 0, NULL);
	check_kvm();

	struct job job = read_job(job_path);
	int out = open_port("stdout"), err = open_port("stderr");
	if (out < 0 || err < 0)
		fail("no virtio-serial ports named 'stdout' and 'stderr'");
	char *limit = cmdline_value(cmdline, "npt.timeout");
	unsigned timeout = limit ? strtoul(limit, NULL, 10) : 0;
	start_heartbeat();
	say("npt-host: ready; running %s in %s", job.argv[0], job.cwd);
	int status = run_job(&job, out, err, timeout);
	// Whatever the job left running goes now, before the disk does.
	kill(-1, SIGKILL);
	while (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
		;
	close(out);
	close(err);
	if (status < 0)
		report("timeout %u", timeout);
	else
		report("status %d", status);
	finish();
}
