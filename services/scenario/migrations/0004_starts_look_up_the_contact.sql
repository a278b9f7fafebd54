-- Starting a run checks the contact's earlier runs of the scenario through
-- `runs_of_contact` (a contact has few runs), never through an index that
-- leads with the scenario: under a campaign's storm the statistics call the
-- new scenario rare and such a plan walks every run of the campaign. The
-- index made for that check (0003) serves nothing now; it only slows every
-- insert.
DROP INDEX runs_of_contact_in_scenario;
