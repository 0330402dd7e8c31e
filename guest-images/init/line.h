// One formatted line, for writing with a single write(2) so that lines
// stay whole on a console. Shared by the test init and the NPT host's init.
#ifndef PMEMVM_LINE_H
#define PMEMVM_LINE_H

#include <stdarg.h>
#include <stdio.h>

// Formats into buf (len bytes) and ends it with a newline, truncating a
// long line; returns the line's length.
static int format_line(char *buf, size_t len, const char *fmt, va_list ap)
{
	int n = vsnprintf(buf, len - 1, fmt, ap);
	if (n < 0)
		return 0;
	if (n > (int)len - 2)
		n = len - 2;
	buf[n++] = '\n';
	return n;
}

#endif
