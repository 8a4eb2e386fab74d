-- ListChanges filtered by caller reads an index in revision order, like the tenant and
-- user filters (0003).
CREATE INDEX changes_by_caller ON changes (caller, revision);
