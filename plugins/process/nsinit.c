/*
 * nsinit: starts a `process` job's workload, or CRIU restoring one, as the child of
 * PID 1 of new PID and mount namespaces, then becomes the job's supervisor.
 *
 * Native because every millisecond before CRIU starts is restore time: the launcher
 * spawns this small program (vfork + exec) instead of forking its own large Python
 * process twice, and the namespace's init is this program, not an interpreter.
 *
 *   nsinit -s FD [-d] [-c WORD]... -o FD [-i FD]... [-p PIDFILE] [-C DIR] [-e FD] -- ARGV...
 *
 *   -s FD    where the reply goes: {"pid": INIT, "ns_root": ROOT, "start_ticks": T}
 *            (INIT: the init's host PID; ROOT: the workload's PID in the namespace;
 *            T: the init's start time as in /proc/PID/stat), or {"error": "..."}
 *   -d       detach: the supervisor is not the caller's child
 *   -c WORD  one word of the supervisor's command line, exec'd once the reply is sent,
 *            with the init's PID appended
 *   -o FD    the child's stdout and stderr (its stdin is /dev/null)
 *   -i FD    another file descriptor the child keeps (CRIU's --inherit-fd)
 *   -p FILE  the child is CRIU restoring the workload; ROOT is the PID it writes to FILE.
 *            Without -p the child is the workload, in a session of its own.
 *   -C DIR   the child's working directory
 *   -e FD    the child's whole environment: K=V entries, each ended by a NUL, read from FD
 *            (a memory file) by the child itself, so that neither our command line (ps) nor
 *            our memory holds it. Without -e the child keeps our environment.
 *
 * The init forwards the signals a user sends it (TERM, INT, HUP, QUIT, USR1, USR2, WINCH)
 * to ROOT, reaps every process of the namespace and exits as ROOT did (128 + N for
 * signal N). Standard C and Linux only; built with the package (setup.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_ITEMS 256

struct opts {
	int status, out, detach;
	int inherit[MAX_ITEMS], n_inherit;
	char *supervisor[MAX_ITEMS + 2];
	int n_supervisor;
	int env;
	const char *pidfile, *cwd;
	char **argv;
};

/* Where a failed start of the child stopped, sent to the init through a close-on-exec pipe. */
enum step { STEP_EXEC, STEP_CHDIR, STEP_ENV };
struct child_error {
	int step, err;
};

static int status_fd = -1;

/* A JSON string of `text`, into `buf`. */
static void json_string(char *buf, size_t size, const char *text)
{
	size_t n = 0;
	buf[n++] = '"';
	for (; *text && n + 8 < size; text++) {
		unsigned char c = (unsigned char)*text;
		if (c == '"' || c == '\\')
			n += snprintf(buf + n, size - n, "\\%c", c);
		else if (c < 0x20)
			n += snprintf(buf + n, size - n, "\\u%04x", c);
		else
			buf[n++] = (char)c;
	}
	buf[n++] = '"';
	buf[n] = '\0';
}

/* Reply {"error": MESSAGE} (or say it on stderr once the reply is gone) and exit. */
static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
	char message[1024], quoted[2200];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(message, sizeof(message), fmt, ap);
	va_end(ap);
	if (status_fd >= 0) {
		json_string(quoted, sizeof(quoted), message);
		dprintf(status_fd, "{\"error\": %s}", quoted);
	} else {
		dprintf(2, "nsinit: %s\n", message);
	}
	_exit(1);
}

static int fd_arg(const char *text)
{
	char *end;
	long fd = strtol(text, &end, 10);
	if (*text == '\0' || *end != '\0' || fd < 0 || fd > 1 << 20)
		fail("not a file descriptor: '%s'", text);
	return (int)fd;
}

static void parse(int argc, char **argv, struct opts *o)
{
	int c;
	memset(o, 0, sizeof(*o));
	o->status = o->out = o->env = -1;
	while ((c = getopt(argc, argv, "+s:dc:o:i:p:C:e:")) != -1) {
		if ((c == 'i' && o->n_inherit == MAX_ITEMS) || (c == 'c' && o->n_supervisor == MAX_ITEMS))
			fail("more than %d -%c options", MAX_ITEMS, c);
		switch (c) {
		case 's': o->status = status_fd = fd_arg(optarg); break;
		case 'd': o->detach = 1; break;
		case 'c': o->supervisor[o->n_supervisor++] = optarg; break;
		case 'o': o->out = fd_arg(optarg); break;
		case 'i': o->inherit[o->n_inherit++] = fd_arg(optarg); break;
		case 'p': o->pidfile = optarg; break;
		case 'C': o->cwd = optarg; break;
		case 'e': o->env = fd_arg(optarg); break;
		default: fail("usage: nsinit -s FD [-d] [-c WORD]... -o FD [-i FD]... [-p PIDFILE] [-C DIR] [-e FD] -- ARGV...");
		}
	}
	if (o->status < 0 || o->out < 0 || o->n_supervisor == 0 || optind >= argc)
		fail("usage: nsinit needs -s, -o, -c and a command");
	o->argv = argv + optind;
}

/* Close descriptors from..to; by hand where the kernel has no close_range (before 5.9). */
static void close_fds(unsigned from, unsigned to)
{
	if (close_range(from, to, 0) == 0 || errno != ENOSYS)
		return;
	long max = sysconf(_SC_OPEN_MAX);
	for (long fd = from; fd <= (long)to && fd < max; fd++)
		close((int)fd);
}

/* Close every descriptor from 3 up except the n in keep (in any order). */
static void close_except(const int *keep, int n)
{
	unsigned from = 3;
	for (;;) {
		int next = -1; /* the lowest kept descriptor from `from` up */
		for (int i = 0; i < n; i++)
			if (keep[i] >= (int)from && (next < 0 || keep[i] < next))
				next = keep[i];
		if (next < 0)
			break;
		if ((unsigned)next > from)
			close_fds(from, next - 1);
		from = next + 1;
	}
	close_fds(from, ~0U);
}

static void close_child_fds(const struct opts *o)
{
	close(o->out);
	if (o->env >= 0)
		close(o->env);
	for (int i = 0; i < o->n_inherit; i++)
		close(o->inherit[i]);
}

/* The environment in `fd`: K=V entries, each ended by a NUL; NULL (errno set) if unreadable. */
static char **read_env(int fd)
{
	struct stat st;
	size_t n = 0, count = 0;
	if (fstat(fd, &st) != 0)
		return NULL;
	char *buf = malloc((size_t)st.st_size + 1);
	if (!buf)
		return NULL;
	while (n < (size_t)st.st_size) {
		ssize_t got = pread(fd, buf + n, (size_t)st.st_size - n, (off_t)n);
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0) {
			errno = got == 0 ? EIO : errno;
			return NULL;
		}
		n += (size_t)got;
	}
	buf[n] = '\0';
	for (size_t i = 0; i < n; i++)
		count += buf[i] == '\0';
	char **env = calloc(count + 1, sizeof(char *));
	if (!env)
		return NULL;
	for (size_t i = 0, k = 0; k < count; k++, i += strlen(buf + i) + 1)
		env[k] = buf + i;
	return env;
}

/* In the forked child: stdio, environment, descriptors, session, directory, then exec. */
static void __attribute__((noreturn)) exec_child(const struct opts *o, int error_pipe)
{
	struct child_error e = {STEP_EXEC, 0};
	int keep[MAX_ITEMS + 1];
	int null = open("/dev/null", O_RDONLY);
	if (null < 0 || dup2(null, 0) < 0 || dup2(o->out, 1) < 0 || dup2(o->out, 2) < 0)
		goto failed;
	if (o->env >= 0) { /* before the descriptors close; execvp then searches its PATH */
		char **env = read_env(o->env);
		if (!env) {
			e.step = STEP_ENV;
			goto failed;
		}
		environ = env;
	}
	memcpy(keep, o->inherit, sizeof(int) * o->n_inherit);
	keep[o->n_inherit] = error_pipe; /* close-on-exec: open until the exec succeeds */
	close_except(keep, o->n_inherit + 1);
	if (!o->pidfile)
		setsid(); /* the workload leads a session of its own; CRIU stays in the init's */
	if (o->cwd && chdir(o->cwd) != 0) {
		e.step = STEP_CHDIR;
		goto failed;
	}
	execvp(o->argv[0], o->argv);
failed:
	e.err = errno;
	if (write(error_pipe, &e, sizeof(e)) < 0)
		_exit(126);
	_exit(127);
}

/* Start the child; its PID once its exec succeeded. */
static pid_t start_child(const struct opts *o)
{
	struct child_error e;
	int error_pipe[2];
	ssize_t n;
	if (pipe2(error_pipe, O_CLOEXEC) != 0)
		fail("pipe: %s", strerror(errno));
	pid_t pid = fork();
	if (pid < 0)
		fail("fork: %s", strerror(errno));
	if (pid == 0) {
		close(error_pipe[0]);
		exec_child(o, error_pipe[1]);
	}
	close(error_pipe[1]);
	while ((n = read(error_pipe[0], &e, sizeof(e))) < 0 && errno == EINTR)
		;
	close(error_pipe[0]);
	if (n != sizeof(e))
		return pid; /* the pipe closed on exec */
	waitpid(pid, NULL, 0);
	if (e.step == STEP_CHDIR)
		fail("cannot enter '%s': %s", o->cwd, strerror(e.err));
	if (e.step == STEP_ENV)
		fail("cannot read the environment: %s", strerror(e.err));
	fail("cannot run '%s': %s", o->argv[0], strerror(e.err));
}

/* Make CRIU and its helpers take PIDs from the top of the range, leaving the low ones,
 * where the restored tree's PIDs are, free in this fresh namespace. */
static void high_pids(void)
{
	long top = 0;
	FILE *f = fopen("/proc/sys/kernel/pid_max", "r");
	int ok = f && fscanf(f, "%ld", &top) == 1;
	if (f)
		fclose(f);
	if (!ok)
		fail("cannot read /proc/sys/kernel/pid_max");
	f = fopen("/proc/sys/kernel/ns_last_pid", "w");
	ok = f && fprintf(f, "%ld", top - 1024) > 0;
	if (!f || fclose(f) != 0 || !ok)
		fail("cannot write /proc/sys/kernel/ns_last_pid: %s", strerror(errno));
}

/* Wait for CRIU; the restored tree's root, from its pidfile. */
static pid_t restored_root(const struct opts *o, pid_t criu)
{
	int status, root = 0;
	while (waitpid(criu, &status, 0) < 0)
		if (errno != EINTR)
			fail("waitpid: %s", strerror(errno));
	if (WIFSIGNALED(status))
		fail("criu restore failed (signal %d)", WTERMSIG(status));
	if (WEXITSTATUS(status) != 0)
		fail("criu restore failed (exit %d)", WEXITSTATUS(status));
	FILE *f = fopen(o->pidfile, "r");
	int ok = f && fscanf(f, "%d", &root) == 1;
	if (f)
		fclose(f);
	if (!ok)
		fail("criu wrote no PID to %s", o->pidfile);
	return root;
}

/* What the init forwards to the workload: the signals a user sends to stop, interrupt or
 * notify it. The kernel drops any other (SIGKILL excepted) sent to a namespace's init
 * without a handler, from outside as from inside. */
static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
static volatile pid_t forward_to;

static void forward(int sig)
{
	int saved = errno;
	kill(forward_to, sig);
	errno = saved;
}

/* From now on a signal sent to the init reaches `root` instead, as under tini; installed
 * once `root` runs: the child forked before then (the workload, or CRIU) exec'd with the
 * default dispositions, and until then the kernel drops those signals. */
static void forward_signals(pid_t root)
{
	struct sigaction sa = {.sa_handler = forward, .sa_flags = SA_RESTART};
	sigemptyset(&sa.sa_mask);
	forward_to = root;
	for (size_t i = 0; i < sizeof(forwarded) / sizeof(forwarded[0]); i++)
		if (sigaction(forwarded[i], &sa, NULL) != 0)
			fail("sigaction: %s", strerror(errno));
}

/* PID 1 of the namespace: reap everything, exit as the root did (128 + N for signal N). */
static void __attribute__((noreturn)) reap(pid_t root)
{
	for (;;) {
		int status;
		pid_t pid = waitpid(-1, &status, 0);
		if (pid < 0 && errno == EINTR)
			continue;
		if (pid < 0)
			_exit(0);
		if (pid == root)
			_exit(WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status));
	}
}

/* The init: a /proc of its own (CRIU and CUDA read /proc by PID), then the child; it
 * reports {"root": ROOT} (or {"error": ...}) on `report`, and reaps. */
static void __attribute__((noreturn)) init(const struct opts *o, int report)
{
	pid_t root;
	status_fd = report;
	setsid();
	if (unshare(CLONE_NEWNS) != 0)
		fail("unshare(CLONE_NEWNS): %s", strerror(errno));
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
		fail("mount --make-rprivate /: %s", strerror(errno));
	if (mount("proc", "/proc", "proc", 0, NULL) != 0)
		fail("mount /proc: %s", strerror(errno));
	if (o->pidfile)
		high_pids();
	root = start_child(o);
	close_child_fds(o);
	if (o->pidfile)
		root = restored_root(o, root);
	forward_signals(root);
	dprintf(report, "{\"root\": %d}", root);
	close(report);
	reap(root);
}

/* When `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat). */
static unsigned long long start_ticks(pid_t pid)
{
	char path[64], buf[1024];
	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof(buf) - 1);
	if (fd >= 0)
		close(fd);
	if (n <= 0)
		fail("cannot read %s", path);
	buf[n] = '\0';
	char *field = strrchr(buf, ')');
	for (int i = 0; field && i < 20; i++) /* state is field 3, after the first space */
		field = strchr(field + 1, ' ');
	if (!field)
		fail("cannot parse %s", path);
	return strtoull(field + 1, NULL, 10);
}

/* The init's report: the root's PID, or its error relayed as the reply. */
static pid_t read_report(int fd, pid_t init_pid)
{
	char buf[4096];
	size_t n = 0;
	ssize_t got;
	int root;
	while (n < sizeof(buf) - 1 && (got = read(fd, buf + n, sizeof(buf) - 1 - n)) != 0) {
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			break;
		n += got;
	}
	buf[n] = '\0';
	close(fd);
	if (sscanf(buf, "{\"root\": %d}", &root) == 1)
		return root;
	waitpid(init_pid, NULL, 0);
	if (n == 0)
		fail("the namespace init died");
	if (write(status_fd, buf, n) < 0)
		_exit(2);
	_exit(1);
}

static void reset_signals(void)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL); /* what the caller ignored; fails harmlessly for SIGKILL, SIGSTOP */
}

int main(int argc, char **argv)
{
	struct opts o;
	int report[2], host;
	char init_text[16];
	reset_signals();
	parse(argc, argv, &o);
	if (o.detach) {
		pid_t pid = fork();
		if (pid < 0)
			fail("fork: %s", strerror(errno));
		if (pid > 0)
			_exit(0); /* the caller reaps this; the supervisor lives on, re-parented */
	}
	host = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC);
	if (host < 0 || pipe2(report, O_CLOEXEC) != 0)
		fail("cannot prepare the namespace: %s", strerror(errno));
	if (unshare(CLONE_NEWPID) != 0)
		fail("unshare(CLONE_NEWPID): %s", strerror(errno));
	pid_t init_pid = fork();
	if (init_pid < 0)
		fail("fork: %s", strerror(errno));
	if (init_pid == 0) {
		int keep[MAX_ITEMS + 3];
		memcpy(keep, o.inherit, sizeof(int) * o.n_inherit);
		keep[o.n_inherit] = o.out;
		keep[o.n_inherit + 1] = report[1];
		keep[o.n_inherit + 2] = o.env; /* -1 (none) keeps nothing */
		close_except(keep, o.n_inherit + 3);
		init(&o, report[1]);
	}
	unsigned long long ticks = start_ticks(init_pid);
	/* the supervisor's own children (its control server) stay out of the job's namespace */
	if (setns(host, CLONE_NEWPID) != 0)
		fail("setns: %s", strerror(errno));
	close(host);
	close(report[1]);
	close_child_fds(&o);
	pid_t root = read_report(report[0], init_pid);
	dprintf(o.status, "{\"pid\": %d, \"ns_root\": %d, \"start_ticks\": %llu}", init_pid, root, ticks);
	close(o.status);
	status_fd = -1;
	snprintf(init_text, sizeof(init_text), "%d", init_pid);
	o.supervisor[o.n_supervisor] = init_text;
	o.supervisor[o.n_supervisor + 1] = NULL;
	execv(o.supervisor[0], o.supervisor);
	fail("cannot supervise: %s", strerror(errno));
}
