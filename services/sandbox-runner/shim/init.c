/*
 * bulkhead-init: the init shim of a Bulkhead sandbox.
 *
 * The sandbox-runner mounts this static binary read-only into the sandbox
 * and makes it the entrypoint; the agent's argv follows as its arguments.
 * The credentials never appear in the container's configuration: the runner
 * writes them to the shim's standard input as one frame,
 *
 *     "BHI1" | u32be body_len | body
 *     body = { u32be key_len | key | u32be value_len | value }*
 *
 * followed by the task payload. The shim reads exactly the frame (with raw
 * read(2), so not one byte of the payload is consumed), puts each pair into
 * its environment, wipes its copy of the frame, and execs the agent, which
 * inherits the environment and reads the payload from the same stdin.
 *
 * Exit codes before exec: 125 for a bad frame, 127 when the agent cannot be
 * executed (the shell's convention).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#define MAX_BODY (16u << 20)
#define MAX_KEY 128u

static void die(int code, const char *what)
{
    /* A fixed message: never a key's value. */
    fprintf(stderr, "bulkhead-init: %s\n", what);
    _exit(code);
}

static void read_exact(unsigned char *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(0, buf + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die(125, "credential frame truncated");
        got += (size_t)n;
    }
}

static uint32_t be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static int valid_key(const unsigned char *k, uint32_t len)
{
    if (len == 0 || len > MAX_KEY || (k[0] >= '0' && k[0] <= '9'))
        return 0;
    for (uint32_t i = 0; i < len; i++) {
        unsigned char c = k[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        die(127, "no agent command");
    /*
     * No core dumps, soft and hard limit, before a credential is read: a core
     * holds the environment, and would be a file in the process sandbox's
     * directory or, through a core_pattern pipe (systemd-coredump, apport),
     * on the host's disk. The limit survives exec; without CAP_SYS_RESOURCE
     * the agent cannot raise it again.
     */
    const struct rlimit no_core = {0, 0};
    if (setrlimit(RLIMIT_CORE, &no_core) != 0)
        die(125, "cannot disable core dumps");
    unsigned char head[8];
    read_exact(head, sizeof head);
    if (memcmp(head, "BHI1", 4) != 0)
        die(125, "not a credential frame");
    uint32_t len = be32(head + 4);
    if (len > MAX_BODY)
        die(125, "credential frame too large");
    unsigned char *body = malloc(len + 1u);
    if (body == NULL)
        die(125, "out of memory");
    read_exact(body, len);

    char key[MAX_KEY + 1];
    uint32_t at = 0;
    while (at < len) {
        if (len - at < 4)
            die(125, "malformed credential frame");
        uint32_t klen = be32(body + at);
        at += 4;
        if (klen > len - at || !valid_key(body + at, klen))
            die(125, "malformed credential frame");
        memcpy(key, body + at, klen);
        key[klen] = '\0';
        at += klen;
        if (len - at < 4)
            die(125, "malformed credential frame");
        uint32_t vlen = be32(body + at);
        at += 4;
        if (vlen > len - at || memchr(body + at, '\0', vlen) != NULL)
            die(125, "malformed credential frame");
        /* setenv copies; the value is NUL-terminated in place, then wiped below. */
        unsigned char saved = body[at + vlen];
        body[at + vlen] = '\0';
        if (setenv(key, (const char *)(body + at), 1) != 0)
            die(125, "cannot set the environment");
        body[at + vlen] = saved;
        at += vlen;
    }
    explicit_bzero(body, len + 1u);
    free(body);
    explicit_bzero(key, sizeof key);

    execvpe(argv[1], argv + 1, environ);
    fprintf(stderr, "bulkhead-init: cannot execute the agent: %s\n", strerror(errno));
    return 127;
}
