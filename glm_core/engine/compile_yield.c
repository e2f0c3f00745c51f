/* A profile function, in C, for the thread that compiles decode graphs: while the engine has work, the compile
 * runs `slice_s` at a time and then sleeps `pause_s` without the GIL, so the engine's thread decodes at nearly
 * its own speed beside a compile (glm_core/engine/compile_yield.py says why and what it costs).
 *
 * The engine's thread puts it on the compile's thread when it has work (glm_yield_on); it takes itself off as
 * soon as the engine is idle, so a compile runs at full speed (no profiling at all) whenever nobody waits. A
 * profile function rather than a trace function: the interpreter reports calls and returns to it, never lines.
 * `busy` (the object given with it) is a Python callable, asked at most once per slice.
 * Built by compile_yield.py, loaded with ctypes.PyDLL (its functions are called with the GIL held).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <time.h>

static double slice_s = 0.001, pause_s = 0.02;
static _Thread_local double since;       /* when this thread last asked `busy` or slept (0: ask at once) */
static _Thread_local unsigned int count; /* events since: the clock is read every 64 */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int on_event(PyObject *busy, PyFrameObject *frame, int what, PyObject *arg) {
    (void)frame, (void)what, (void)arg;
    if ((++count & 63) != 0) return 0;
    double t = now();
    if (t - since < slice_s) return 0;
    since = t;
    PyObject *answer = PyObject_CallNoArgs(busy);
    int yes = answer ? PyObject_IsTrue(answer) : 0;
    Py_XDECREF(answer);
    if (yes < 0 || !answer) PyErr_Clear(); /* a failing `busy` counts as idle */
    if (yes <= 0) {                        /* idle: off until the engine has work again */
        since = 0;
        PyEval_SetProfile(NULL, NULL);
        return 0;
    }
    struct timespec pause = {(time_t)pause_s, (long)((pause_s - (double)(time_t)pause_s) * 1e9)};
    Py_BEGIN_ALLOW_THREADS
    nanosleep(&pause, NULL);
    Py_END_ALLOW_THREADS
    since = now();
    return 0;
}

/* Put the hook on the thread `ident` (threading.get_ident()) of this interpreter, unless it is on already:
 * 1 when it is on, 0 when no such thread, -1 on error. */
int glm_yield_on(unsigned long ident, PyObject *busy, double slice, double pause) {
    slice_s = slice;
    pause_s = pause;
    for (PyThreadState *t = PyInterpreterState_ThreadHead(PyInterpreterState_Get()); t; t = PyThreadState_Next(t)) {
        if (t->thread_id != ident) continue;
        if (t->c_profilefunc == on_event) return 1;
        return _PyEval_SetProfile(t, on_event, busy) == 0 ? 1 : -1;
    }
    return 0;
}
