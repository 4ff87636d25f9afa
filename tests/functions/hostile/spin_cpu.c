/* Hostile function: spins the CPU. Under a CPU-time limit it is killed by SIGXCPU (soft limit)
 * or SIGKILL (hard limit). Bounded: gives up after 60 s of wall time. */
#include <stdio.h>
#include <time.h>

int main(void) {
    volatile unsigned long sink = 0;
    time_t start = time(NULL);
    while (time(NULL) - start < 60) {
        for (unsigned long i = 0; i < 10000000UL; i++) {
            sink += i;
        }
    }
    printf("survived %lu\n", sink);
    return 0;
}
