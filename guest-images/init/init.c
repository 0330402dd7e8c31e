// pmemvm guest init: a tiny static PID 1 (built with musl, tens of KB) that
// runs one test mode and reports its result through the pmemvm exit port.
//
// The mode comes from the kernel command line: pmemvm_mode=NAME (default
// "demo"). Each mode prints "pmemvm-init: <mode> ok" or "... FAILED: why",
// then writes its status byte to the exit port, which ends pmemvm with it.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

// Must match vmm::EXIT_PORT in pmemvm.
#define PMEMVM_EXIT_PORT 0xf4

static char cmdline[4096];

static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	// One write per line keeps lines whole on the serial console.
	if (write(1, buf, n) < 0) {
		/* nothing else to report to */
	}
}

// Ends the VM with `status` through the exit port; falls back to a reboot,
// which pmemvm also turns into a clean exit (status 0).
static void __attribute__((noreturn)) vm_exit(int status)
{
	unsigned char b = (unsigned char)status;
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

static int mode_demo(void)
{
	say("pmemvm-init: hello from the pmemvm guest");
	return 0;
}

struct mode {
	const char *name;
	int (*run)(void);
};

static const struct mode modes[] = {
	{ "demo", mode_demo },
};

int main(void)
{
	say("pmemvm-init: started");
	mount_basics();
	if (read_cmdline())
		say("pmemvm-init: cannot read /proc/cmdline: %s", strerror(errno));

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
