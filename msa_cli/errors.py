"""User-facing errors: each carries the exit code the CLI returns (documented in README.md)."""

# Exit codes. Keep this table and the README's in step.
OK = 0
INTERNAL = 1        # a bug: the CLI still prints one line (MSA_DEBUG=1 shows the traceback)
USAGE = 2           # bad arguments (click's own code)
NO_BANK = 3         # no memory bank where one was expected
BANK_MISMATCH = 4   # the bank was built with another model, router or settings, or is unreadable
NO_MODEL = 5        # the model cannot be found or loaded
NOTHING_INGESTED = 6
ABSTAINED = 7       # nothing in memory is relevant to the question (with `msa ask -`: to any of them)
BANK_LOCKED = 8     # another process holds the bank's write lock
RANK_FAILED = 9     # a sharded run (torchrun) lost a rank: it stopped, or did not answer in time
INTERRUPTED = 130


class MsaError(Exception):
    """An error the user can act on; the CLI prints its message as one line and exits with `code`."""

    code = INTERNAL

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class BankNotFound(MsaError):
    code = NO_BANK


class BankMismatch(MsaError):
    code = BANK_MISMATCH


class BankLocked(MsaError):
    code = BANK_LOCKED


class ModelUnavailable(MsaError):
    code = NO_MODEL
