"""The delivery ledger: freeze the audience, claim batches, record outcomes, reconcile.

The database is the only source of truth. A broker message only says "look at batch N";
losing it loses nothing because the reconciler finds queued rows nobody is working on, and
running it twice sends nothing twice because a claim only takes rows still `queued`.

Life of a delivery row (one transition function per cause, no ad-hoc updates elsewhere):

    queued --claim_batch--> claimed --250------------------------> sent
      ^  ^                    |------4xx/552/socket, before the deadline--> queued (backoff)
      |  |                    |------4xx/552/socket, past the deadline----> failed
      |  |                    |------other 5xx (at RCPT: also a bounce)---> failed
      |  |                    |------message cannot be built--------------> failed (parked)
      |  +---release (paused)-+------unsubscribed/erased since the freeze-> skipped
      +-----lease expired-----+------release or lease expired (cancelled)-> cancelled
    queued --cancel_issue--> cancelled

One module per step, each readable on its own:

    freeze.py     the audience frozen into delivery rows, cut into batches
    claims.py     a batch's rows claimed under a lease, held, released, expired
    outcomes.py   one outcome written, fenced by the lease; the consecutive-failure brake
    sender.py     the sending loop (build -> throttle -> transmit -> record), run_in_process
    control.py    pause, resume, cancel, reconcile, finish an issue
    status.py     an issue's counts and report
    cache.py      the per-process cache of prepared issues
    batches.py    what they share: tables, the batch lock and stored counts
    policy.py     leases, retries and backoff

docs/delivery-guarantees.md states what this promises and where SMTP leaves a window.
"""
