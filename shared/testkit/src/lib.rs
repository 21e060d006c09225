pub mod external;
