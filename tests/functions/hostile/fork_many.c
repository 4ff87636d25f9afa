/* Hostile function: tries to fork 300 children (each sleeps 2 s, then exits) and reaps them.
 * Under a process limit fork fails early with EAGAIN. Prints how many forks succeeded. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define ATTEMPTS 300

int main(void) {
    int forked = 0;
    int failed = 0;
    fflush(stdout); /* nothing buffered may be duplicated into the children */
    for (int i = 0; i < ATTEMPTS; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            printf("fork failed: %s\n", strerror(errno));
            failed = 1;
            break;
        }
        if (pid == 0) {
            sleep(2);
            _exit(0);
        }
        forked++;
    }
    printf("forked %d\n", forked);
    fflush(stdout);
    while (wait(NULL) > 0) {
    }
    return failed ? 4 : 0;
}
