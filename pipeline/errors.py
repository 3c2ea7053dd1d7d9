"""The one error type the CLI turns into a clean one-line message (exit code 2, no traceback)."""


class InputError(Exception):
    """Bad user input: the message names the file (or config key) and the problem."""


def find_input_error(exc: BaseException) -> InputError | None:
    """The InputError behind `exc`, if any: Ray wraps a worker's exception (a Ray Train worker failure holds a
    RayTaskError holding the cause), and its wrappers subclass the cause's type with a traceback as message."""
    todo, seen = [exc], set()
    while todo:
        error = todo.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, InputError) and not hasattr(error, "cause"):
            return error
        failures = getattr(error, "worker_failures", None)
        inner = [
            getattr(error, "_base_exc", None),
            getattr(error, "cause", None),
            error.__cause__,
            error.__context__,
            *(failures.values() if isinstance(failures, dict) else []),
        ]
        todo += [e for e in inner if isinstance(e, BaseException)]
    return None
