"""The one error a user can fix (a wrong path, a missing step, a stale artifact): printed as one
`error:` line by runner.run_script, never as a traceback."""
import errno

# what the file system says when it is full, read-only or not ours: the user's to fix, not a bug
FILE_SYSTEM_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


class PipelineError(Exception):
    """An error the user can fix (wrong path, missing step, stale artifact): printed as one line."""
