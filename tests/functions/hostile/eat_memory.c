/* Hostile function: allocates and touches 1 GiB in 16 MiB steps, printing how far it got.
 * Under a memory limit it must be stopped early: malloc fails (RLIMIT_AS, exit 3) or the
 * cgroup OOM killer sends SIGKILL. Bounded: 64 steps at most. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STEP_MIB 16
#define STEPS 64 /* 64 * 16 MiB = 1 GiB */

static char *blocks[STEPS]; /* kept reachable so the compiler cannot drop the allocations */

int main(void) {
    for (int i = 0; i < STEPS; i++) {
        blocks[i] = malloc((size_t)STEP_MIB << 20);
        if (blocks[i] == NULL) {
            printf("malloc failed after %d MiB\n", i * STEP_MIB);
            return 3;
        }
        memset(blocks[i], 0xA5, (size_t)STEP_MIB << 20); /* touch every page: make it resident */
        printf("reached %d MiB\n", (i + 1) * STEP_MIB);
        fflush(stdout);
    }
    printf("done %d\n", blocks[STEPS - 1][0]);
    return 0;
}
