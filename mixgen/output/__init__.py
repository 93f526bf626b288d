"""Everything that lives in OUT: the names of its files (``layout``, the one place they are
spelled), the writers and tar files, manifests, caches, the run record, resume and overwrite rules,
and the lock that shares OUT among workers."""
